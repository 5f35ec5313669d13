"""The node pack's settings and attention override, in-process (no server; nodes/config.py and
nodes/override.py import no ComfyUI code). Call conventions are those of ComfyUI 0.3.75
(shared/COMFYUI.md): override(func, q, k, v[, heads], heads=, skip_reshape=, skip_output_reshape=,
mask=, transformer_options=). The real-server tests are in test_nodes_sparge.py."""
import copy
import math

from devkit.metrics import rel_l2 as rel
from devkit.pack import load_pack

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparge_attention.nodes.config import (  # noqa: E402
    CUSTOM_SCORING,
    DenseBlocksError,
    SpargeConfig,
    format_dense_blocks,
    parse_dense_blocks,
)
from sparge_attention.nodes import sparse_call  # noqa: E402
from sparge_attention.nodes.override import SpargeOverride  # noqa: E402
from sparge_attention.nodes.stats import ForwardContext, RunStats, fold_forward  # noqa: E402
from sparge_attention.nodes.readout import build_readout, format_line  # noqa: E402
from sparge_attention.sparge_core import torch_op  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("text,expected", [
    ("", set()), ("   ", set()), (None, set()), ("0", {0}), ("0, 1, 38-39", {0, 1, 38, 39}),
    (" 3 ,3, 2-4 ,", {2, 3, 4}), ("7-7", {7}), ("1;2", {1, 2}),
])
def test_parse_dense_blocks(text, expected):
    assert parse_dense_blocks(text) == expected


@pytest.mark.parametrize("text,needle", [
    ("3-", "'3-'"), ("a", "'a'"), ("a,b", "'a'"), ("5-2", "backwards"), ("-1", "'-1'"), ("1 2", "'1 2'"),
    ("1.5", "'1.5'"), ("0-999999999", "too long"),
])
def test_parse_dense_blocks_errors(text, needle):
    with pytest.raises(DenseBlocksError) as ei:
        parse_dense_blocks(text)
    assert needle in str(ei.value) and "dense_blocks" in str(ei.value)


def test_format_dense_blocks():
    assert format_dense_blocks({0, 1, 2, 5, 7, 8}) == "0-2, 5, 7-8"


def test_preset_overrides_sliders_custom_uses_them():
    for name, preset in PRESETS.items():
        for mode in ("cdf", "topk", "share"):
            c = SpargeConfig.from_widgets(preset=name, mode=mode, simthreshd1=0.9, cdfthreshd=0.5, topk=0.01, pvthreshd=3,
                                          minshare=0.0)
            assert c.params == preset.params(), name
    c = SpargeConfig.from_widgets(preset="Custom", mode="cdf", simthreshd1=0.2, cdfthreshd=0.9, pvthreshd=30)
    assert (c.params.mode, c.params.cdfthreshd, c.params.simthreshd1, c.params.pvthreshd) == ("cdf", 0.9, 0.2, 30.0)
    assert c.params.scoring == CUSTOM_SCORING
    c = SpargeConfig.from_widgets(preset="Custom", mode="topk", topk=0.3, pvthreshd=100)
    assert c.params.mode == "topk" and c.params.topk == 0.3 and math.isinf(c.params.pvthreshd)
    assert c.describe()["pvthreshd"] is None  # off, JSON-safe
    c = SpargeConfig.from_widgets(preset="Custom", mode="share", minshare=0.7, cdfthreshd=0.9, topk=0.3)
    assert (c.params.mode, c.params.minshare, c.params.cdfthreshd, c.params.topk) == ("share", 0.7, None, None)
    assert c.threshold() == 0.7 and c.describe()["minshare"] == 0.7


def test_schedule_window():
    c = SpargeConfig.from_widgets(preset="Fast", start_percent=0.25, end_percent=0.75)
    assert [c.in_schedule(i / 4) for i in range(4)] == [False, True, True, False]
    assert SpargeConfig.from_widgets().in_schedule(0.99) and SpargeConfig.from_widgets().in_schedule(None)


# ----------------------------------------------------------------------------- the override
KEEP_ALL = dict(preset="Custom", mode="cdf", simthreshd1=-1.0, cdfthreshd=1.0, min_tokens=128)


def sdpa_func(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """Stands in for ComfyUI's attention_pytorch (same layouts and mask convention)."""
    if not skip_reshape:
        b, n, hd = q.shape
        q, k, v = (t.view(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sdpa_func.calls += 1
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])
    return out


sdpa_func.calls = 0


def make(config=None, prev=None, **widgets):
    cfg = config or SpargeConfig.from_widgets(**dict(KEEP_ALL, **widgets))
    return SpargeOverride(cfg, prev=prev, node_id="7")


def ctx_for(grids=((2, 8, 8),), context_tokens=None, sparse_on=True, n_double=0):
    return ForwardContext(step=0, sigma=1.0, percent=0.0, sparse_on=sparse_on, grids=grids,
                          context_tokens=context_tokens, n_double=n_double)


def qkv(b=1, h=2, n=256, d=64, nk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, nk, d, generator=g),
            torch.randn(b, h, nk, d, generator=g))


def test_wan_layout_sparse_and_close_to_dense():
    ov = make()
    q, k, v = qkv(b=2, n=128 * 2)
    flat = [t.transpose(1, 2).reshape(2, 256, 128) for t in (q, k, v)]
    ctx = ctx_for(grids=((1, 16, 16),))
    to = {ov.key: ctx}
    sdpa_func.calls = 0
    out = ov(sdpa_func, *flat, heads=2, transformer_options=to)
    assert sdpa_func.calls == 0  # ran sparse
    ref = sdpa_func(*flat, heads=2)
    assert out.shape == (2, 256, 128) and rel(out, ref) < 2e-2
    assert len(ctx.records) == 1 and int(ctx.records[0].kept) == ctx.records[0].total == 2 * 2 * 4 * 2
    assert ctx.hilbert_used == 1 and ctx.last_grid == (1, 16, 16) and ctx.self_attn_calls == 1


def test_hunyuan_layout_keeps_output_layout_and_text_rows():
    ov = make()
    q, k, v = qkv(n=128 + 16)  # image grid (2, 8, 8) then 16 text tokens
    ctx = ctx_for(context_tokens=16, n_double=1)
    to = {ov.key: ctx, "block_type": "single", "block_index": 0}
    out = ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape
    assert rel(out[:, :, 128:], ref[:, :, 128:]) < 2e-2  # text rows are computed and stay in place
    assert rel(out, ref) < 2e-2
    assert ctx.last_grid == (2, 8, 8) and ctx.last_tail == 16
    assert ctx.max_layer == 1  # single block 0 after one double block = layer 1
    out2 = ov(sdpa_func, q, k, v, 2, skip_reshape=True, transformer_options=to)
    assert out2.shape == (1, 144, 128)  # skip_output_reshape False -> (B, N, H*D)


def test_ineligible_calls_run_the_original_or_the_previous_override():
    seen = []

    def prev(func, *args, **kwargs):
        seen.append(args[1].shape[-2] if kwargs.get("skip_reshape") else args[1].shape[1])
        return func(*args, **kwargs)

    ov = make(prev=prev, dense_blocks="1", min_tokens=200)
    q, k, v = qkv(n=256)
    ctx = ctx_for(grids=((4, 8, 8),))
    to = {ov.key: ctx}
    _, kt, vt = qkv(n=256, nk=16, seed=1)
    ref_cross = F.scaled_dot_product_attention(q, kt, vt)
    out = ov(sdpa_func, q, kt, vt, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    assert torch.equal(out, ref_cross)  # cross-attention: exactly ComfyUI's own result
    ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)  # layer 0: sparse
    ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)  # layer 1: dense
    qs, ks, vs = qkv(n=150)
    ov(sdpa_func, qs, ks, vs, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)  # short
    ctx_off = ctx_for(sparse_on=False)
    ov(sdpa_func, q, k, v, 2, skip_reshape=True, transformer_options={ov.key: ctx_off})  # schedule
    ov(sdpa_func, q.double(), k.double(), v.double(), 2, skip_reshape=True, transformer_options=to)  # dtype
    assert ctx.dense == {"cross attention": 1, "dense block": 1, "short": 1, "dtype": 1}
    assert ctx_off.dense == {"schedule": 1}
    assert len(ctx.records) == 1
    assert seen == [16, 256, 150, 256, 256]  # every dense call went through prev, none of the sparse ones


def test_key_padding_mask_is_exact_and_other_masks_fall_back():
    ov = make()
    q, k, v = qkv(n=128 + 16)
    ctx = ctx_for(context_tokens=16)
    to = {ov.key: ctx, "block_type": "double", "block_index": 0}
    mask = torch.zeros(1, 1, 144)
    mask[..., -5:] = -torch.finfo(torch.float32).max  # HunyuanVideo's text padding
    out = ov(sdpa_func, q, k, v, 2, mask=mask, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    # exactly sparse attention over the unmasked keys (the text tail stays after the grid)
    direct = torch_op.call(q, k[:, :, :-5], v[:, :, :-5], ov.config.params, grid=(2, 8, 8))[0]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    assert rel(out, ref) < 2e-2
    assert ctx.dense == {} and len(ctx.records) == 1 and ctx.hilbert_used == 1  # still sparse, with Hilbert
    assert torch.equal(out, direct)
    # bool key padding per batch item
    q2, k2, v2 = qkv(b=2, n=144, seed=3)
    keep = torch.ones(2, 144, dtype=torch.bool)
    keep[0, -3:] = False
    keep[1, -7:] = False
    out = ov(sdpa_func, q2, k2, v2, 2, mask=keep[:, None, :], skip_reshape=True, skip_output_reshape=True,
             transformer_options=to)
    ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=keep[:, None, None, :])
    assert rel(out, ref) < 2e-2
    # a real bias or a per-query mask: dense, reason "mask"
    bias = torch.randn(1, 1, 144)
    ov(sdpa_func, q, k, v, 2, mask=bias, skip_reshape=True, transformer_options=to)
    full = torch.zeros(144, 144)
    ov(sdpa_func, q, k, v, 2, mask=full, skip_reshape=True, transformer_options=to)
    assert ctx.dense == {"mask": 2}


def test_grid_mismatch_runs_sparse_without_hilbert():
    ov = make()
    q, k, v = qkv(n=256)
    ctx = ctx_for(grids=((3, 8, 8),))
    ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options={ov.key: ctx})
    assert len(ctx.records) == 1 and ctx.hilbert_used == 0 and ctx.hilbert_not == {"grid mismatch": 1}


def failing_kernel(*a, **kw):
    raise RuntimeError("sparse kernel failure injected by the test")


def test_injected_kernel_failure_runs_dense(monkeypatch):
    monkeypatch.setattr(sparse_call, "run_sparse", failing_kernel)
    ov = make()
    q, k, v = qkv(n=256)
    ctx = ctx_for(grids=((4, 8, 8),))
    to = {ov.key: ctx}
    out = ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert ctx.dense == {"kernel error": 1}


def test_failed_call_is_not_retried_in_the_same_run(monkeypatch):
    ov = make()
    tries = []
    real = sparse_call.run_sparse
    fail = [True]

    def counting(*a, **kw):
        tries.append(1)
        if fail[0]:
            failing_kernel()
        return real(*a, **kw)

    monkeypatch.setattr(sparse_call, "run_sparse", counting)
    q, k, v = qkv(n=256)
    ctx = ctx_for(grids=((4, 8, 8),))
    to = {ov.key: ctx}
    for _ in range(3):
        ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    assert len(tries) == 1 and ctx.dense == {"kernel error": 3}
    ov._failed.clear()  # what the start of the next sampling run does
    fail[0] = False
    ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options={ov.key: ctx})
    assert len(tries) == 2 and len(ctx.records) == 1


def test_deepcopy_keeps_the_same_override():
    ov = make()
    opts = {"transformer_options": {"optimized_attention_override": ov}}
    assert copy.deepcopy(opts)["transformer_options"]["optimized_attention_override"] is ov


def test_readout_from_folded_forwards():
    ov = make(mode="topk", topk=0.5)
    ov.run = RunStats.start(torch.tensor([1.0, 0.5, 0.0]))
    q, k, v = qkv(n=256)
    for step in (0, 1):
        ctx = ForwardContext(step, [1.0, 0.5][step], step / 2, True, ((4, 8, 8),), None, 0)
        to = {ov.key: ctx}
        ov(sdpa_func, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
        _, kt, vt = qkv(n=256, nk=16)
        ov(sdpa_func, q, kt, vt, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
        fold_forward(ov.run, ctx)
    r = build_readout(ov, ov.run)
    assert r["node_id"] == "7" and r["steps_run"] == 2 and r["n_steps"] == 2
    assert r["sparse_calls"] == 2 and r["dense_calls"] == {"cross attention": 2}
    assert r["sparsity"] == pytest.approx(0.5) and r["per_step_sparsity"] == [pytest.approx(0.5)] * 2
    full = 4.0 * 2 * 256 * 256 * 64
    cross = 4.0 * 2 * 256 * 16 * 64
    assert r["attention_flops"] == pytest.approx(2 * (full + cross))
    # half the blocks, plus the fill_skipped pass (one mean per 128-key block: 1/128 of a dense call)
    assert ov.config.params.fill_skipped
    assert r["attention_flops_computed"] == pytest.approx(2 * (full / 2 + full / 128 + cross))
    assert r["est_attention_speedup"] == pytest.approx((full + cross) / (full / 2 + full / 128 + cross))
    line = format_line(r)
    assert "sparsity 50.0%" in line and "cross attention 2" in line and "Hilbert on (4, 8, 8)" in line
    assert r["cuda_graphs"] is None and not any("CUDA graphs" in n for n in r["notes"])  # no sampling run here
    ov.last_graphs = {"replays": 0, "captures": 0, "eager": 3, "graphs": 0, "disabled": "capturing: ValueError: x"}
    notes = build_readout(ov, ov.run)["notes"]
    assert any(n.startswith("CUDA graphs off (capturing: ValueError: x)") for n in notes), notes
