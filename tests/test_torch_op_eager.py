"""torch_op.call runs the ops' implementation directly outside torch.compile tracing (no dispatcher,
no threshold round trip): it must return exactly what the registered ops return, for each variant
(plain, with the block mask, with the lse), per-head thresholds and a Hilbert grid included."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from devkit.pack import load_pack  # noqa: E402

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402

from sparge_attention.sparge_core import SpargeParams  # noqa: E402
from sparge_attention.sparge_core import torch_op  # noqa: E402

INF = float("inf")
CASES = {
    "share+fill, per-head minshare, grid": (SpargeParams(simthreshd1=-1.0, minshare=torch.tensor([1.0, 4.0]),
                                                          pvthreshd=INF, scoring="lse", fill_skipped=True), (2, 8, 16)),
    "cdf pooled, P.V skip": (SpargeParams(simthreshd1=-1.0, cdfthreshd=0.6, pvthreshd=6.0), None),
    "topk causal": (SpargeParams(simthreshd1=-1.0, topk=0.5, is_causal=True), None),
}


def by_op(q, k, v, p, grid, op):
    H = q.shape[1]
    return op(q, k, v, torch_op.thresholds(p.simthreshd1, H), torch_op.thresholds(p.threshold, H),
              torch_op.thresholds(p.pvthreshd, H), p.mode, bool(p.is_causal), list(grid or []), -1.0, p.scoring,
              bool(p.fill_skipped))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["plain", "mask", "lse"])
def test_eager_call_equals_the_registered_op(case, variant):
    params, grid = CASES[case]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256 + 40, 64, generator=g) for _ in range(3))
    op = {"plain": torch_op.sparge_attention_op, "mask": torch_op.sparge_attention_map_op,
          "lse": torch_op.sparge_attention_lse_op}[variant]
    want = by_op(q, k, v, params, grid, op)
    got = torch_op.call(q, k, v, params, grid, with_mask=variant == "mask", with_lse=variant == "lse")
    assert len(got) == len(want) == (3 if variant == "plain" else 4)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert int(got[1]) < 2 * 5 * 3 or params.is_causal  # the call really ran sparse (kept < all blocks)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [256 + 40, 40], ids=["sparse", "dense"])
def test_map_first_is_the_ops_mask_of_the_first_item_packed(case, n):
    """call(map_first=True) (the sparsity map's block) returns the "sparge::attention_map" op's mask
    of the first batch item, bit-packed; also when the call runs dense (every block)."""
    from sparge_attention.sparge_core.blockmask import pack_mask

    params, grid = CASES[case]
    grid = grid if n > 256 else None
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, 64, generator=g) for _ in range(3))
    want = by_op(q, k, v, params, grid, torch_op.sparge_attention_map_op)
    got = torch_op.call(q, k, v, params, grid, map_first=True)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
    assert got[3].dtype == torch.uint8 and torch.equal(got[3], pack_mask(want[3][0]))
    with pytest.raises(ValueError, match="one of them"):
        torch_op.call(q, k, v, params, map_first=True, with_mask=True)


def test_attention_sink_is_refused_not_dropped():
    q = torch.randn(1, 2, 256, 64)
    with pytest.raises(ValueError, match="attention_sink"):
        torch_op.call(q, q, q, SpargeParams(attention_sink=True))


@pytest.mark.parametrize("variant", ["plain", "mask", "lse"])
def test_eager_call_equals_the_op_when_the_call_runs_dense(variant):
    """Shorter than one query block: sparge_attention runs it dense; counts, mask and lse alike."""
    params = CASES["cdf pooled, P.V skip"][0]
    q, k, v = (torch.randn(1, 2, 40, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    op = {"plain": torch_op.sparge_attention_op, "mask": torch_op.sparge_attention_map_op,
          "lse": torch_op.sparge_attention_lse_op}[variant]
    want = by_op(q, k, v, params, None, op)
    got = torch_op.call(q, k, v, params, with_mask=variant == "mask", with_lse=variant == "lse")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_eager_output_is_token_major_and_the_op_matches_its_fake(monkeypatch):
    """Outside tracing the Triton kernel's output comes back token-major ((B, N, H, D) memory, as
    flash attention returns it), so the node's merge back to ComfyUI's (B, N, H*D) is a view, not a
    copy of the output. The registered op returns the contiguous layout its fake declares (compiled
    graphs check it, and graphs an earlier version of the pack cached on disk expect it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparge_attention.sparge_core.layout import merge_heads

    monkeypatch.setattr(torch_op, "BACKEND", "triton")  # the interpreter, as on a GPU
    params, grid = CASES["share+fill, per-head minshare, grid"]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 256 + 40, 64, generator=g) for _ in range(3))
    for variant in ("plain", "mask", "lse"):
        out = torch_op.call(q, k, v, params, grid, with_mask=variant == "mask", with_lse=variant == "lse")[0]
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous(), variant
        assert merge_heads(out).data_ptr() == out.data_ptr()
    real = by_op(q, k, v, params, grid, torch_op.sparge_attention_op)[0]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the thresholds are real CPU tensors
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fake = by_op(fq, fk, fv, params, grid, torch_op.sparge_attention_op)[0]
    assert real.is_contiguous() and fake.stride() == real.stride()
