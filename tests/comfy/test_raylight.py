"""Sparge Attention on every rank of a Raylight USP sampler (nodes/raylight.py), on the CPU.

* Two simulated Ulysses ranks (heads split in two, the sequence padded to a multiple of 2 with
  garbage rows) run their per-rank calls through the integration; their outputs, concatenated over
  heads, equal one rank doing all heads, and the summed readout equals the single rank's counts.
* Ring degree 2, simulated as yunchang's ring loop runs it (two key shards per rank, merged by
  yunchang's update_out_and_lse): keep-all settings equal one rank's attention within int8 error,
  the Balanced preset runs every step sparse (no "ring attention"), the pad key is never attended.
  A ring call that reaches the override without the ring path stays dense with xfuser's lse.
* The hooks patch yunchang's ring module (xfuser's needs CUDA: on a machine without it xfuser sets
  `select_flash_attn_impl = None`, and its package imports diffusers) and remove themselves.
* Without xfuser / yunchang (hidden) nothing is patched and the pack works.
* Two real processes (gloo): yunchang's LongContextAttention with the hooks, Ulysses 2 (equals one
  process with all heads) and ring 2 (equals the simulated ring), and RankStats sums both ranks'
  counts over torch.distributed (~10 s each).
"""
import os
import socket
import subprocess
import sys
import textwrap

from devkit.pack import ROOT, load_pack

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from devkit.metrics import rel_l2 as rel  # noqa: E402
from devkit.realistic_inputs import make_video_qkv  # noqa: E402
from sparge_attention.nodes import raylight as R  # noqa: E402
from sparge_attention.nodes.config import SpargeConfig  # noqa: E402
from sparge_attention.nodes.override import SpargeOverride  # noqa: E402
from sparge_attention.nodes.readout import build_readout  # noqa: E402
from sparge_attention.nodes.stats import ForwardContext, RunStats, fold_forward  # noqa: E402

GRID = (1, 31, 33)  # 1023 tokens: Raylight pads them to 1024 for 2 ranks
SPARSE = dict(preset="Custom", mode="cdf", simthreshd1=-1.0, cdfthreshd=0.7, min_tokens=128)


def torch_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    """A per-rank function as xfuser selects it: (B, N, h, D) -> (out, lse (B, h, N))."""
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    s = qt @ kt.transpose(-1, -2) * (softmax_scale or q.shape[-1] ** -0.5)
    torch_fn.calls += 1
    return (s.softmax(-1) @ vt).to(q.dtype).transpose(1, 2), torch.logsumexp(s, -1)


torch_fn.calls = 0


def rank(heads=slice(None), ring=1, ulysses=1, observers=(), widgets=SPARSE, ring_rank=0, state=None):
    cfg = SpargeConfig.from_widgets(**widgets)
    ov = SpargeOverride(cfg, node_id="5", observers=observers)
    ctx = ForwardContext(step=0, sigma=1.0, percent=0.0, sparse_on=True, grids=(GRID,), context_tokens=None,
                         n_double=0)
    to = {ov.key: ctx, "optimized_attention_override": ov}
    return ov, ctx, R.Active(to, (GRID[0] * GRID[1] * GRID[2],), ulysses, ring, ring_rank, state)


def inputs(pad=0, seed=0):
    q, k, v, _ = make_video_qkv(grid=GRID, heads=4, head_dim=64, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    # Raylight's pad rows are zeros before the projections; after them they are anything
    q, k, v = (torch.cat([t, 3 * torch.randn(1, 4, pad, 64, generator=g)], 2) for t in (q, k, v))
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, N, H, D) as xfuser hands them over


def run_of(ctx):
    run = RunStats.start(torch.tensor([1.0, 0.0]))
    fold_forward(run, ctx)
    return run


@pytest.mark.parametrize("pad", [0, 1])
def test_two_simulated_ulysses_ranks_equal_one_rank(pad):
    n = GRID[0] * GRID[1] * GRID[2]
    q, k, v = inputs(pad=0)
    ov1, ctx1, act1 = rank()
    torch_fn.calls = 0
    single, _ = R.rank_attention(act1, torch_fn, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False)
    assert torch_fn.calls == 0 and len(ctx1.records) == 1  # ran sparse, through the Sparge override
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert rel(single, ref) < 0.15  # sane sparse attention at cdf 0.7; the exact check is ranks vs one rank
    kept1, total1 = int(ctx1.records[0].kept), ctx1.records[0].total
    assert kept1 < total1  # something was skipped

    qp, kp, vp = inputs(pad=pad)
    outs, runs = [], []
    for r in range(2):  # Ulysses: rank r holds heads 2r, 2r+1 of the whole (padded) sequence
        ov, ctx, act = rank(ulysses=2, observers=(R.RankStats(),))
        hs = slice(2 * r, 2 * r + 2)
        out, lse = R.rank_attention(act, torch_fn, qp[:, :, hs], kp[:, :, hs], vp[:, :, hs])
        assert out.shape == qp[:, :, hs].shape and lse.shape == (1, 2, n + pad) and lse.dtype == torch.float32
        assert torch.all(out[:, n:] == 0)  # pad queries: not computed
        assert ctx.hilbert_used == 1 and ctx.last_grid == GRID  # the pad was cut: the grid matched
        outs.append(out[:, :n])
        runs.append((ov, run_of(ctx)))
    assert torch_fn.calls == 0
    both = torch.cat(outs, 2)
    assert torch.allclose(both, single, atol=1e-5), (both - single).abs().max()

    # every rank's readout sums both ranks (RankStats.run_finished does this over torch.distributed)
    (ov0, run0), (_, run1) = runs
    R.add_summary(run0, R.summary(run1))
    got = build_readout(ov0, run0)
    want = build_readout(ov1, run_of(ctx1))
    assert got["kept_blocks"] == want["kept_blocks"] == kept1 and got["total_blocks"] == want["total_blocks"]
    assert got["sparse_calls"] == 2 and want["sparse_calls"] == 1
    assert got["sparsity"] == pytest.approx(want["sparsity"])


KEEP_ALL = dict(preset="Custom", mode="topk", topk=1.0, simthreshd1=-1.0, min_tokens=128)


def simulated_ring(widgets, pad_scale=1.0):
    """Ring degree 2 (Ulysses 1), as yunchang's ring_flash_attn_forward runs it: ring rank r holds
    query shard r; at step s it gets the k/v shard of rank (r - s) % 2 and merges by update_out_and_lse.
    The pad key (the last token, in shard 1) is scaled: attended, it would dominate."""
    utils = pytest.importorskip("yunchang.ring.utils")
    q, k, v = inputs(pad=1)
    k[:, -1], v[:, -1] = k[:, -1] * pad_scale, v[:, -1] * pad_scale
    half = q.shape[1] // 2
    shards = [tuple(t[:, i * half:(i + 1) * half] for t in (q, k, v)) for i in range(2)]
    outs, ctxs, ovs = [], [], []
    torch_fn.calls = 0
    for r in range(2):
        ov, ctx, act = rank(ring=2, ring_rank=r, observers=(R.RankStats(),), widgets=widgets, state=[])
        token = R._FORWARD.set(act)
        try:
            out = lse = None
            qs = shards[r][0]
            for step in range(2):
                _, ks, vs = shards[(r - step) % 2]
                block_out, block_lse = R.rank_attention(act, torch_fn, qs, ks, vs, dropout_p=0.0,
                                                        softmax_scale=None, causal=False)
                assert block_lse.shape == (1, 4, half) and block_lse.dtype == torch.float32
                assert torch.isfinite(block_lse).all()
                out, lse = utils.update_out_and_lse(out, lse, block_out, block_lse)
        finally:
            R._FORWARD.reset(token)
        outs.append(out.to(q.dtype))
        ctxs.append(ctx)
        ovs.append(ov)
    n = GRID[0] * GRID[1] * GRID[2]
    assert torch.all(outs[1][:, -1] == 0)  # the pad query: not computed
    got = torch.cat(outs, 1)[:, :n]
    ref = F.scaled_dot_product_attention(*(t[:, :n].transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return got, ref, ctxs, ovs


def test_simulated_ring_degree_two_keep_all_matches_one_rank():
    got, ref, ctxs, _ = simulated_ring(KEEP_ALL, pad_scale=100.0)
    assert torch_fn.calls == 0  # every step ran through the sparse op, with its lse
    q, k, v = inputs(pad=0)  # one rank, the whole sequence, keep-all: the same int8 quantization error
    single = R.rank_attention(rank(widgets=KEEP_ALL)[2], torch_fn, q, k, v)[0]
    err_one = rel(single, ref)
    assert rel(got, ref) < max(2 * err_one, 1e-3), (rel(got, ref), err_one)  # the pad key never attended
    for ctx in ctxs:  # two steps of one block: two records of layer 0, no dense call, no Hilbert order
        assert len(ctx.records) == 2 and ctx.record_layers == [0, 0] and not ctx.dense
        assert ctx.hilbert_used == 0 and ctx.hilbert_not == {"ring shard": 2}
        assert all(int(c.kept) == c.total for c in ctx.records)


def test_simulated_ring_degree_two_balanced_runs_sparse():
    widgets = dict(preset="Balanced", min_tokens=128)
    got, ref, ctxs, ovs = simulated_ring(widgets, pad_scale=100.0)
    assert torch_fn.calls == 0
    assert rel(got, ref) < 0.15  # sane sparse attention; the pad key was not attended
    run0, run1 = (run_of(c) for c in ctxs)
    R.add_summary(run0, R.summary(run1))
    ro = build_readout(ovs[0], run0)
    assert ro["sparse_calls"] == 4 and ro["kept_blocks"] < ro["total_blocks"], ro
    assert ro["dense_calls"] == {} and not ctxs[0].dense and not ctxs[1].dense  # no "ring attention"


def test_ring_call_through_the_override_stays_dense_with_its_lse():
    """A ring call outside a forward of this pack's wrapper (no ring state) cannot return an lse
    from the override: RankStats keeps it dense."""
    q, k, v = inputs(pad=0)
    ov, ctx, act = rank(ring=2, ulysses=1, observers=(R.RankStats(),))
    token = R._FORWARD.set(act)  # RankStats reads the degrees of the forward in progress
    try:
        torch_fn.calls = 0
        out, lse = R.rank_attention(act, torch_fn, q, k, v)
    finally:
        R._FORWARD.reset(token)
    ref_out, ref_lse = torch_fn(q, k, v)
    assert torch_fn.calls == 2 and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert ctx.dense == {R.R_RING: 1} and not ctx.records


def test_cross_attention_and_other_calls_keep_xfusers_function():
    q, k, v = inputs(pad=1)
    ov, ctx, act = rank(ulysses=2)
    kt, vt = k[:, :512], v[:, :512]  # text keys: another length
    torch_fn.calls = 0
    out, _ = R.rank_attention(act, torch_fn, q, kt, vt)
    assert torch_fn.calls == 1 and ctx.dense == {"cross attention": 1}
    assert torch.allclose(out, torch_fn(q, kt, vt)[0])
    out, lse = R.rank_attention(act, torch_fn, q, k, v, causal=True)  # not attention the override knows
    assert torch_fn.calls == 3 and ctx.dense == {"cross attention": 1}


def test_hooks_patch_yunchang_only_inside_a_patched_forward_and_remove_cleanly():
    ring = pytest.importorskip("yunchang.ring.ring_flash_attn")  # scripts/setup.sh installs it
    import yunchang.kernels as kernels

    original = ring.select_flash_attn_impl
    assert original is kernels.select_flash_attn_impl and not R._ORIGINAL
    assert R.install_hooks() == ["yunchang.ring.ring_flash_attn"]
    assert R.install_hooks() == ["yunchang.ring.ring_flash_attn"]  # idempotent
    try:
        patched = ring.select_flash_attn_impl
        assert patched is not original and kernels.select_flash_attn_impl is original
        fwd = patched(kernels.AttnType.TORCH_MATH, stage="fwd-only")
        assert fwd.func is original(kernels.AttnType.TORCH_MATH, stage="fwd-only").func  # no forward: unchanged
        q, k, v = inputs()
        ov, ctx, act = rank()
        token = R._FORWARD.set(act)
        try:
            out, lse = patched(kernels.AttnType.TORCH_MATH, stage="fwd-only")(q, k, v, dropout_p=0.0,
                                                                              softmax_scale=None, causal=False)
            assert patched(kernels.AttnType.TORCH_MATH, stage="bwd-only") is not None
        finally:
            R._FORWARD.reset(token)
        assert len(ctx.records) == 1 and out.shape == q.shape
    finally:
        R.remove_hooks()
    assert ring.select_flash_attn_impl is original and R._ORIGINAL == {} and R._FORWARD.get() is None
    R.remove_hooks()  # twice: nothing left to do
    assert ring.select_flash_attn_impl is original


def test_without_xfuser_and_yunchang_nothing_is_patched(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("xfuser", "yunchang"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "xfuser", None)  # `import xfuser` raises ImportError
    monkeypatch.setitem(sys.modules, "yunchang", None)
    assert R.install_hooks() == [] and R._ORIGINAL == {}
    assert R._degrees() == (1, 1, 0)
    q, k, v = inputs()
    ov, ctx, act = rank()
    out = ov(None, *(t.transpose(1, 2) for t in (q, k, v)), heads=4, skip_reshape=True, skip_output_reshape=True,
             transformer_options=act.to)
    assert len(ctx.records) == 1 and out.shape == (1, 4, q.shape[1], 64)  # the plain node path is untouched


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)])
def test_two_real_processes_with_yunchangs_attention(tmp_path, ulysses, ring):
    pytest.importorskip("yunchang")
    script = textwrap.dedent(f"""
        import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})

        def work(r, port, out_dir):
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=r, world_size=2)
            import yunchang
            from yunchang.kernels import AttnType
            from test_raylight import R, rank, inputs, run_of, build_readout, GRID
            U, RG = int(sys.argv[3]), int(sys.argv[4])
            yunchang.set_seq_parallel_pg(U, RG, r, 2)
            attn = yunchang.LongContextAttention(attn_type=AttnType.TORCH_MATH)
            assert R.install_hooks() == ["yunchang.ring.ring_flash_attn"]
            q, k, v = inputs(pad=1)  # (1, 1024, 4, 64), the same on both ranks
            sl = slice(512 * r, 512 * r + 512)  # USP input: this rank's half of the sequence, all heads
            ov, ctx, act = rank(ulysses=U, ring=RG, ring_rank=r if RG > 1 else 0, observers=(R.RankStats(),),
                                state=[])
            token = R._FORWARD.set(act)
            out = attn(q[:, sl], k[:, sl], v[:, sl])
            R._FORWARD.reset(token)
            R.remove_hooks()
            run = run_of(ctx)
            R.RankStats().run_finished(run, True)  # all_gather_object over gloo
            torch.save(dict(out=out, readout=build_readout(ov, run)), os.path.join(out_dir, f"r{{r}}.pt"))
            dist.destroy_process_group()
            # skip the interpreter's teardown: gloo's threads can abort the process there ("terminate
            # called without an active exception", cf. pytorch#179291; seen once in ~15 runs)
            sys.stdout.flush()
            os._exit(0)

        if __name__ == "__main__":
            mp.spawn(work, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """)
    path = tmp_path / "two_ranks.py"
    path.write_text(script)
    with socket.socket() as sock:  # a free port for the two ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, str(path), str(port), str(tmp_path), str(ulysses), str(ring)],
                       capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = [torch.load(tmp_path / f"r{i}.pt", weights_only=False) for i in range(2)]
    n = GRID[0] * GRID[1] * GRID[2]
    both = torch.cat([x["out"] for x in res], 1)[:, :n]  # all-gather of the sequence halves, pad dropped
    if ring == 1:
        q, k, v = inputs(pad=0)
        ov1, ctx1, act1 = rank()
        single, _ = R.rank_attention(act1, torch_fn, q, k, v)
        want = build_readout(ov1, run_of(ctx1))
    else:  # yunchang's ring loop and merge equal the simulated ring; two steps on each rank
        single, _, ctxs, ovs = simulated_ring(SPARSE)
        run0 = run_of(ctxs[0])
        R.add_summary(run0, R.summary(run_of(ctxs[1])))
        want = build_readout(ovs[0], run0)
    # other processes, other thread counts: float sums may round differently (one int8 step at most)
    assert rel(both, single) < 1e-4, (both - single).abs().max()
    for x in res:  # both ranks' readouts cover both ranks
        assert x["readout"]["kept_blocks"] == want["kept_blocks"] and x["readout"]["sparse_calls"] == 2 * ring
        assert x["readout"]["total_blocks"] == want["total_blocks"] and x["readout"]["dense_calls"] == {}


@pytest.mark.timeout(300)
def test_worker_side_patch_on_a_real_comfyui_model(tmp_path):
    """What each Ray worker does (RayWorker.model_function_runner, then common_ksampler's
    comfy.sample.sample), in a ComfyUI 0.3.75 process without Raylight: the node's function loads
    the pack from its folder, patches the model; patching again replaces (never chains) the
    override; sampling runs sparse and logs the readout; the node's schema takes RAY_ACTORS (~20 s)."""
    script = textwrap.dedent(f"""
        import logging, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from devkit.tiny_models import _import_comfy, make_tiny_wan21_t2v
        _import_comfy()
        import comfy.sd, comfy.sample
        from comfy.patcher_extension import WrappersMP
        path = make_tiny_wan21_t2v({str(tmp_path / "wan.safetensors")!r}, in_process=True)
        model = comfy.sd.load_diffusion_model(str(path))
        from devkit.pack import ROOT as PACK
        name = "ComfyUI-SpargeAttn_worker"  # another module name than any test uses: loaded from the folder
        widgets = dict(preset="Custom", mode="cdf", simthreshd1=-1.0, cdfthreshd=0.9, min_tokens=256)
        fn = None
        import importlib
        from devkit.pack import load_pack
        rl = importlib.import_module(load_pack().__name__ + ".nodes.raylight")  # the main process's copy
        for preset in ("Fast", "Custom"):  # the node runs twice on the same worker model
            model = rl.worker_patch(str(PACK), name, dict(widgets, preset=preset), "9", -1)(model)
        ov = model.model_options["transformer_options"]["optimized_attention_override"]
        assert type(ov).__module__ == name + ".nodes.override" and ov.prev is None and ov.config.preset == "Custom"
        for kind, keys in ((WrappersMP.APPLY_MODEL, {{"sparge_attention": 1, "sparge_attention_raylight": 1}}),
                           (WrappersMP.OUTER_SAMPLE, {{"sparge_attention": 1}})):
            assert {{k: len(v) for k, v in model.wrappers[kind].items()}} == keys, model.wrappers[kind]
        latent = torch.zeros(1, 16, 2, 32, 32)
        cond = [[torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0)), {{}}]]
        noise = comfy.sample.prepare_noise(latent, 1)
        out = comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", cond, cond, latent, seed=1)
        assert out.shape == latent.shape and torch.isfinite(out).all()
        mod = sys.modules[name + ".nodes.raylight"]
        readout = sys.modules[name + ".nodes.routes"].last_readouts()["9"]
        print("READOUT", readout["sparse_calls"], readout["total_blocks"], readout["dense_calls"])
        assert readout["sparse_calls"] > 0 and readout["node_id"] == "9"
        print("HOOKS", mod.install_hooks(), mod._FORWARD.get())
        mod.remove_hooks()
        schema = importlib.import_module(name + ".nodes.raylight_node").SpargeAttentionRaylight.define_schema()
        ids = [i.id for i in schema.inputs]
        assert ids[0] == "ray_actors" and "model" not in ids and "profile" not in ids and "preset" in ids, ids
        assert schema.outputs[0].io_type == "RAY_ACTORS"
        # the example workflow's node carries one value per widget, in the schema's order, and they are valid
        import json
        wf = json.load(open({str(ROOT / "workflows" / "raylight" / "wan21_t2v_1.3B_raylight_usp2.json")!r}))
        node = [n for n in wf["nodes"] if n["type"] == "SpargeAttentionRaylight"][0]
        names = [i.id for i in schema.inputs if i.id != "ray_actors"]
        assert len(node["widgets_values"]) == len(names), (names, node["widgets_values"])
        values = dict(zip(names, node["widgets_values"]))
        cls = importlib.import_module(name + ".nodes.raylight_node").SpargeAttentionRaylight
        assert cls.validate_inputs(**{{k: values[k] for k in ("preset", "mode", "dense_blocks", "start_percent",
                                                              "end_percent", "error_check")}}) is True
        config = sys.modules[name + ".nodes.config"].SpargeConfig
        config.from_widgets(**{{k: v for k, v in values.items() if k in mod.WIDGETS}})
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "HOOKS ['yunchang.ring.ring_flash_attn'] None" in r.stdout or "HOOKS [] None" in r.stdout
