"""The node's attention override on CUDA (skipped without a GPU): Triton backend, no host sync per
call, CUDA-event timing in verbose mode, key-padding masks, torch.compile(fullgraph=True, inductor).

No ComfyUI needed: nodes/override.py is driven the way ComfyUI 0.3.75 calls it (a Wan-style
(B, N, H*D) self-attention with a ForwardContext that the APPLY_MODEL wrapper would have made).
Also runs without pytest:  python tests/comfy/test_nodes_gpu.py   (prints timings).
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # devkit, also when run as a script
from devkit.metrics import rel_l2 as _rel  # noqa: E402
from devkit.pack import load_pack  # noqa: E402

load_pack()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import pytest  # noqa: E402

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
except ImportError:  # the device machine may have no pytest: run as a script
    pytest = None

from sparge_attention.nodes.config import SpargeConfig  # noqa: E402
from sparge_attention.nodes.override import SpargeOverride  # noqa: E402
from sparge_attention.nodes.stats import ForwardContext, RunStats, fold_forward  # noqa: E402
from sparge_attention.nodes.readout import build_readout, format_line  # noqa: E402

GRID = (5, 30, 52)  # a Wan 480p latent grid, 5 latent frames: 7800 tokens
B, H, D = 2, 12, 128


def _override(**widgets):
    kw = dict(preset="Custom", mode="topk", topk=0.5, simthreshd1=-1.0, min_tokens=1024, verbose=True)
    kw.update(widgets)
    return SpargeOverride(SpargeConfig.from_widgets(**kw), node_id="9")


def _ctx():
    return ForwardContext(0, 1.0, 0.0, True, (GRID,), None, 0)


def _qkv(n=GRID[0] * GRID[1] * GRID[2], dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, n, H * D, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
    if not skip_reshape:
        b, n, hd = q.shape
        q, k, v = (t.view(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def _time(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def test_cuda_triton_no_sync_timing_and_readout():
    ov = _override()
    q, k, v = _qkv()
    ctx = _ctx()
    to = {ov.key: ctx}
    ov(_sdpa, q, k, v, heads=H, transformer_options=to)  # warm-up: Triton compiles, caches fill
    torch.cuda.synchronize()
    ctx = _ctx()
    to = {ov.key: ctx}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = ov(_sdpa, q, k, v, heads=H, transformer_options=to)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ctx.backends == {"triton"} and len(ctx.records) == 3 and ctx.hilbert_used == 3
    assert len(ctx.events) == 3  # verbose: CUDA events around each sparse call
    ov.run = RunStats.start(torch.tensor([1.0, 0.0]))
    fold_forward(ov.run, ctx)
    r = build_readout(ov, ov.run)
    print(format_line(r))
    assert r["backend"] == "triton" and r["attention_time_ms"] > 0
    assert 0.4 < r["sparsity"] < 0.6  # top-k 0.5
    assert out.shape == q.shape and bool(out.isfinite().all())


def test_cuda_keep_all_matches_sdpa_and_mask():
    ov = _override(mode="cdf", cdfthreshd=1.0)
    q, k, v = _qkv(seed=1)
    out = ov(_sdpa, q, k, v, heads=H, transformer_options={ov.key: _ctx()})
    err = _rel(out, _sdpa(q, k, v, H))
    print(f"keep-all vs SDPA rel L2: {err:.4f}")
    assert err < 0.05
    # HunyuanVideo-style joint attention with a text key-padding mask, (B, H, N, D)
    n = GRID[0] * GRID[1] * GRID[2] + 256
    qh, kh, vh = (t.view(B, n, H, D).transpose(1, 2) for t in _qkv(n=n, seed=2))
    mask = torch.zeros(1, 1, n, device="cuda", dtype=torch.bfloat16)
    mask[..., -40:] = -torch.finfo(torch.bfloat16).max
    ctx = ForwardContext(0, 1.0, 0.0, True, (GRID,), 256, 1)
    to = {ov.key: ctx, "block_type": "double", "block_index": 0}
    out = ov(_sdpa, qh, kh, vh, H, mask=mask, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    err = _rel(out, _sdpa(qh, kh, vh, H, mask=mask, skip_reshape=True, skip_output_reshape=True))
    print(f"joint + key-padding mask vs SDPA rel L2: {err:.4f}")
    assert err < 0.05 and ctx.dense == {} and ctx.hilbert_used == 1


def test_cuda_compile_fullgraph_inductor():
    ov = _override(verbose=False)
    q, k, v = _qkv(seed=3)

    def fn(q, k, v, to):
        return ov(_sdpa, q, k, v, heads=H, transformer_options=to)

    want = fn(q, k, v, {ov.key: _ctx()})
    torch._dynamo.reset()
    ctx = _ctx()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got = compiled(q, k, v, {ov.key: ctx})
    assert torch.equal(got, want)
    assert len(ctx.records) == 1 and ctx.backends == {"triton"}


def test_cuda_sampled_error_kernels_match_the_torch_sums():
    """The measurement's two kernels (kernels/sampled_error.py) against its torch ops, same rows:
    MHA and GQA, contiguous heads and ComfyUI's (B, N, H*D) views, no copy of K or V."""
    from sparge_attention.sparge_core.adapt import exact_sums, sampled_error

    g = torch.Generator(device="cuda").manual_seed(7)

    def check(q, k, v, tol=2e-3):
        out = (F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
               + 0.05 * torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g))
        rows = torch.randint(0, q.shape[2], (256,), device="cuda", generator=g)
        want = exact_sums(q, k, v, out, rows)
        got = sampled_error(q, k, v, out, rows)
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert torch.allclose(got, want, rtol=tol), (got / want - 1).abs().max()
        acc = got.clone()
        assert sampled_error(q, k, v, out, rows, acc=acc) is acc and torch.allclose(acc, 2 * got, rtol=1e-9)

    for n, heads_kv in ((32760, H), (7800, H), (5000, H // 4)):
        q = torch.randn(2, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(2, heads_kv, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        check(q, k, v)
    q, k, v = (torch.randn(2, 32760, H * D, device="cuda", dtype=torch.bfloat16, generator=g).view(2, 32760, H, D)
               .transpose(1, 2) for _ in range(3))
    check(q, k, v)
    out, rows = torch.randn_like(q), torch.randint(0, 32760, (256,), device="cuda", generator=g)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sampled_error(q, k, v, out, rows)
    extra = torch.cuda.max_memory_allocated() - before
    # the rows' partial outputs only; one copy of K alone would be 201 MB
    assert extra < k.numel() * k.element_size() / 4, extra


def test_cuda_error_target_without_sync_in_the_steady_state():
    """A preset's adaptation on realistic attention, driven through the model wrappers: after the
    first forwards (probe, warm-up measurements) no forward makes a host-device sync, measured or
    not, and the run's measured error sits at the target."""
    import contextlib
    from types import SimpleNamespace

    from devkit.realistic_inputs import make_video_qkv
    from devkit.sampling_run import sampling_run
    from sparge_attention.nodes import routes

    q, k, v = (t.to("cuda", torch.bfloat16).expand(B, -1, -1, -1).contiguous()
               for t in make_video_qkv(GRID, H, D, seed=5)[:3])
    ov = SpargeOverride(SpargeConfig.from_widgets(preset="Balanced", min_tokens=1024), node_id="gpu-adapt")
    dm = SimpleNamespace(patch_size=(1, 2, 2), blocks=[0, 1])
    x = torch.zeros(1, 16, GRID[0], GRID[1] * 2, GRID[2] * 2)
    steps, quiet_from = 12, 4

    def forward(x_, t, c_concat, c_crossattn, control, to):
        return [ov(_sdpa, q, k, v, H, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
                for _ in range(2)]

    @contextlib.contextmanager
    def no_sync_from_quiet(i):  # every forward from quiet_from on (the run's end may sync once)
        if i >= quiet_from:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    sampling_run(ov, forward, dm, x, steps, around_forward=no_sync_from_quiet)
    r = routes.last_readouts()["gpu-adapt"]
    print(format_line(r))
    assert r["backend"] == "triton" and r["adaptation"]["measured_calls"] >= 8
    assert 0.75 * 0.04 <= r["measured_rel_l1"] <= 1.25 * 0.04, r["measured_rel_l1"]


def test_cuda_thresholds_moved_in_place_reach_the_kernel():
    """The adaptation moves a block's minshare tensor in place (nodes/adapt.py) and hands the same
    SpargeParams to the op: the next call's kernel must use the new values, not a device copy of the
    first ones (SpargeParams.per_head follows the values)."""
    from sparge_attention.sparge_core import SpargeParams
    from sparge_attention.sparge_core.torch_op import call

    q, k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in _qkv(seed=6))
    share = torch.full((H,), 0.5)
    p = SpargeParams(simthreshd1=-1.0, minshare=share, pvthreshd=float("inf"), scoring="lse", fill_skipped=True)
    kept_low = int(call(q, k, v, p)[1])  # random inputs: every block holds about an even share, all kept
    share.fill_(8.0)  # only each row's top block
    kept_high = int(call(q, k, v, p)[1])
    assert kept_high < 0.5 * kept_low, (kept_low, kept_high)


def test_cuda_graphs_in_a_sampling_run_equal_the_launched_calls():
    """Inside a sampling run the node replays CUDA graphs of its calls (sparge_core/call_graphs.py),
    whatever address each call's output lands at: every call's output equals the same call launched
    kernel by kernel (the override outside a run), the readout's counts agree, the sparsity map's
    block (its mask written by its own graph) keeps the launched call's mask every step, and the
    graphs are gone when the run ends."""
    from types import SimpleNamespace

    from devkit.sampling_run import sampling_run

    ov = _override(verbose=False)
    q, k, v = _qkv(seed=8)
    want = ov(_sdpa, q, k, v, heads=H, transformer_options={ov.key: _ctx()})
    ctx = _ctx()
    ctx.capture_layer = 0  # this call's block: launched, with the map
    ov(_sdpa, q, k, v, heads=H, transformer_options={ov.key: ctx})
    want_map = ctx.map_mask
    outs, kept = [], []

    def forward(x_, t, c_concat, c_crossattn, control, to):
        for _ in range(2):  # every output kept: each call writes at a new address, through the same graph
            outs.append(ov(_sdpa, q, k, v, heads=H, transformer_options=to))
            kept.append(int(to[ov.key].records[-1].kept))

    dm = SimpleNamespace(patch_size=(1, 2, 2), blocks=[0, 1])
    # 8 steps: one of the two calls per forward is the sparsity map's layer (a graph of its own,
    # which also writes the mask); each graph is launched, captured, then replayed 6 times
    sampling_run(ov, forward, dm, torch.zeros(B, 16, GRID[0], GRID[1] * 2, GRID[2] * 2), 8)
    assert ov.graphs is None, "the run's graphs end with it"
    assert ov.last_graphs["replays"] >= 12, ov.last_graphs
    assert ov.last_graphs["captures"] == 2 and ov.last_graphs["disabled"] is None, ov.last_graphs
    for i, out in enumerate(outs):
        assert torch.equal(out, want), (i, (out.float() - want.float()).abs().max().item())
    assert len(set(kept)) == 1, kept
    masks = ov.last_map["masks"]
    assert len(masks) == 8, sorted(masks)
    for step, entry in masks.items():
        assert entry["nk"] == want_map[1] and torch.equal(entry["packed"], want_map[0].cpu()), step


def test_cuda_speed_print():
    """Not an assertion of speed (that is bench/'s job): sparse top-k 0.5 vs SDPA at this shape."""
    q, k, v = _qkv(seed=4)
    for topk in (1.0, 0.5, 0.25):
        ov = _override(topk=topk, verbose=False)
        to = {ov.key: _ctx()}
        ms = _time(lambda: ov(_sdpa, q, k, v, heads=H, transformer_options=to))
        print(f"override top-k {topk}: {ms:.2f} ms")
    print(f"SDPA (bf16): {_time(lambda: _sdpa(q, k, v, H)):.2f} ms")


if __name__ == "__main__":
    from devkit.gpu_script import run_tests

    run_tests(globals())
