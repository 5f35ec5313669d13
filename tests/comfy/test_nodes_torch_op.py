"""sparge_core/torch_op.py: the "sparge::attention" torch custom op and torch.compile.

Op-level torch.compile(fullgraph=True) runs here with the "eager" / "aot_eager" backends (fast);
a whole tiny Wan model compiled with inductor by ComfyUI's TorchCompileModel after the node is
in test_nodes_sparge.py."""
import importlib

from devkit.pack import load_pack

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402

from sparge_attention.nodes.config import SpargeConfig  # noqa: E402
from sparge_attention.nodes.override import SpargeOverride  # noqa: E402
from sparge_attention.nodes.stats import ForwardContext  # noqa: E402
from sparge_attention.sparge_core import SpargeParams, sparge_attention  # noqa: E402
from sparge_attention.sparge_core import torch_op  # noqa: E402


def qkv(b=1, h=2, n=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


@pytest.mark.parametrize("params,grid", [
    (SpargeParams(simthreshd1=-1.0, topk=0.5, pvthreshd=float("inf")), (1, 16, 16)),
    (SpargeParams(simthreshd1=0.0, cdfthreshd=0.9, pvthreshd=20.0), None),
    (SpargeParams(simthreshd1=-1.0, cdfthreshd=0.9, pvthreshd=float("inf"), scoring="lse"), (4, 8, 8)),
])
def test_op_matches_the_api(params, grid):
    q, k, v = qkv()
    out, kept, skipped = torch_op.call(q, k, v, params, grid=grid)
    ref, stats = sparge_attention(q, k, v, params, grid=grid, return_stats=True)
    assert torch.equal(out, ref)
    assert kept.dtype == skipped.dtype == torch.int64 and kept.dim() == skipped.dim() == 0
    assert int(kept) == int(stats.kept_blocks) and int(skipped) == int(stats.pv_skipped)


def test_dense_inside_the_api_counts_every_block():
    q, k, v = qkv(n=32)  # shorter than one query block: sparge_attention runs dense
    out, kept, _ = torch_op.call(q, k, v, SpargeParams(topk=0.1))
    assert int(kept) == torch_op.dense_block_total(q, k) == 2


def test_lse_variant_matches_the_api_and_compiles():
    """"sparge::attention_lse" (ring attention's per-shard call): the api's out, lse and counts, its
    fake shapes pass opcheck, and it traces under torch.compile(fullgraph=True)."""
    q, k, v = qkv(n=320)
    p = SpargeParams(simthreshd1=-1.0, topk=0.5, pvthreshd=float("inf"), scoring="lse", fill_skipped=True)
    out, kept, skipped, lse = torch_op.call(q, k, v, p, with_lse=True)
    ref, ref_lse, stats = sparge_attention(q, k, v, p, return_lse=True, return_stats=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and lse.dtype == torch.float32
    assert lse.shape == q.shape[:3] and int(kept) == int(stats.kept_blocks) < torch_op.dense_block_total(q, k)
    h = torch_op.thresholds
    args = (q, k, v, h(-1.0, 2), h(0.5, 2), h(float("inf"), 2), "topk", False, [], -1.0, "lse", True)
    torch.library.opcheck(torch.ops.sparge.attention_lse.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch._dynamo.reset()
    got = torch.compile(lambda a, b, c: torch_op.call(a, b, c, p, with_lse=True), fullgraph=True,
                        backend="eager")(q, k, v)
    assert torch.equal(got[0], out) and torch.equal(got[3], lse)
    with pytest.raises(ValueError):
        torch_op.call(q, k, v, p, with_mask=True, with_lse=True)


def test_registered_once():
    again = importlib.reload(torch_op)
    assert again.sparge_attention_op is torch.ops.sparge.attention


def test_opcheck():
    q, k, v = qkv(n=192)
    h = torch_op.thresholds
    args = (q, k, v, h(-1.0, 2), h(0.5, 2), h(float("inf"), 2), "topk", False, [3, 8, 8], -1.0, "lse", True)
    torch.library.opcheck(torch.ops.sparge.attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_compile_of_the_op(backend):
    q, k, v = qkv()
    p = SpargeParams(simthreshd1=-1.0, topk=0.5, pvthreshd=float("inf"), scoring="lse")

    def fn(q, k, v):
        out, kept, skipped = torch_op.call(q, k, v, p, grid=(1, 16, 16))
        return out * 2, kept + skipped

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v)
    want = fn(q, k, v)
    assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1])


def test_fullgraph_compile_of_the_override():
    """The node's override (Python bookkeeping + the op) traces without a graph break."""
    ov = SpargeOverride(SpargeConfig.from_widgets(preset="Custom", mode="topk", topk=0.5, simthreshd1=-1.0,
                                                  min_tokens=128), node_id="1")

    def dense(q, k, v, heads, **kw):  # never called: every call is eligible
        raise AssertionError("dense path taken")

    def fn(q, k, v, to):
        return ov(dense, q, k, v, 2, skip_reshape=True, skip_output_reshape=True, transformer_options=to)

    q, k, v = qkv()
    eager_ctx = ForwardContext(0, 1.0, 0.0, True, ((1, 16, 16),), None, 0)
    want = fn(q, k, v, {ov.key: eager_ctx})
    torch._dynamo.reset()
    ctx = ForwardContext(0, 1.0, 0.0, True, ((1, 16, 16),), None, 0)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, {ov.key: ctx})
    assert torch.equal(got, want)
    assert len(ctx.records) == 1 and int(ctx.records[0].kept) == int(eager_ctx.records[0].kept)
    assert ctx.hilbert_used == 1 and ctx.self_attn_calls == 1
