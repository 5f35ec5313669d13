"""Split columns (sparge_core/reference_split.py, NOTES v71): the reference's halves and biases,
and the attention kernel's split step (TRITON_INTERPRET) against the reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import clustered  # noqa: E402
from devkit.metrics import rel_l1  # noqa: E402
from devkit.pack import load_pack  # noqa: E402

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402

from sparge_attention.sparge_core import SpargeParams  # noqa: E402
from sparge_attention.sparge_core.reference import dense_attention, sparse_attention_reference  # noqa: E402
from sparge_attention.sparge_core.reference_predict import (  # noqa: E402
    fill_bias,
    lse_stage1,
    pool_and_similarity,
    select_blocks,
)
from sparge_attention.sparge_core.reference_quant import LOG2E, expand_kv  # noqa: E402
from sparge_attention.sparge_core.reference_split import half_biases, half_tables, predict_split  # noqa: E402
from sparge_attention.sparge_core.triton_split import split_forward  # noqa: E402

BQ, BK = 64, 128


def stage1(q, k, params):
    """The reference's stage 1: (mask, fill bias, lse scores)."""
    D = q.shape[-1]
    qp, qs = pool_and_similarity(q, BQ)
    lse, mean = lse_stage1(qp, k, BK, D ** -0.5)
    mask = select_blocks(qp, qs, None, None, params, D ** -0.5, q.shape[2], k.shape[2], BQ, BK, lse)
    return mask, fill_bias(lse, mean, mask, params, q.shape[2], k.shape[2], BQ, BK), lse


def reference_split_call(q, k, v, params, m, pv_dtype="fp8"):
    mask, bias, lse = stage1(q, k, params)
    bias2, idx, sb = predict_split(q, k, v, lse, bias, m, BQ, BK, pv_dtype)
    out = sparse_attention_reference(q, k, v, mask, params, BQ, BK, fill=bias2, fill_split=(idx, sb), pv_dtype=pv_dtype)[0]
    return out, mask, idx, sb


def test_halves_share_their_blocks_pooled_lse():
    """For the pooled query, a split block's two halves weigh exactly what the block's stage-1 lse
    says (the anchoring), whatever their variances; an empty last half weighs nothing."""
    q, k, v = clustered(1, 2, 700, 64, seed=3, Hkv=1, dtype=torch.float32)  # last block: 60 keys, one half
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, scoring="lse", fill_skipped=True)
    _, _, lse = stage1(q, k, params)
    qp = pool_and_similarity(q, BQ)[0] * (64 ** -0.5 * LOG2E)
    kbar, kvar, _, counts = half_tables(k, v, BK, "fp8")
    assert counts.tolist() == [64.0] * 10 + [60.0, 0.0]
    hb = half_biases(lse, qp, expand_kv(kbar, 2), expand_kv(kvar, 2), counts)
    w = hb + qp @ expand_kv(kbar, 2).transpose(-1, -2)  # log2 weight of each half for the pooled query
    pair = torch.logsumexp(w.unflatten(-1, (-1, 2)) * math.log(2.0), -1) / math.log(2.0)
    assert torch.allclose(pair, lse, atol=1e-4)
    assert torch.isinf(hb[..., -1]).all() and torch.isfinite(hb[..., :-1]).all()


def test_split_lowers_the_reference_error_on_video_attention():
    """The halves of each query block's top skipped blocks bring the estimate closer to the exact
    output at the same mask (CPU study: ~20% less density at rel-L1 0.05)."""
    from devkit.realistic_inputs import make_video_qkv
    from sparge_attention.sparge_core.hilbert import TokenPermutation

    q, k, v, info = make_video_qkv(grid=(8, 16, 32), heads=4, seed=3)
    perm = TokenPermutation.for_grid(info["grid"], q.shape[2])
    q, k, v = (perm.apply(x, 2) for x in (q, k, v))
    ref = dense_attention(q, k, v)
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, scoring="lse", fill_skipped=True)
    mask, bias, _ = stage1(q, k, params)
    base = rel_l1(sparse_attention_reference(q, k, v, mask, params, BQ, BK, fill=bias)[0], ref)
    split = rel_l1(reference_split_call(q, k, v, params, 8)[0], ref)
    assert split < 0.9 * base, (split, base)


@pytest.mark.parametrize("causal,Hkv,D,n,pv,m", [(False, 2, 64, 700, "auto", 2), (True, 1, 64, 650, "auto", 2),
                                                 (False, 1, 80, 777, "auto", 20), (False, 2, 64, 600, "fp16", 3)])
def test_kernel_split_step_matches_reference(causal, Hkv, D, n, pv, m):
    """The attention kernel with split columns (gathered halves after the means' steps) against the
    reference with the same columns; the columns change the output (not vacuous). m = 20: more
    blocks asked for than a query block skips, so some lists run short (their -inf padding)."""
    q, k, v = clustered(1, 2, n, D, seed=n, Hkv=Hkv, dtype=torch.bfloat16)
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, pvthreshd=math.inf, is_causal=causal, scoring="lse",
                          fill_skipped=True)
    pv_ref = "fp16" if pv == "fp16" else "fp8"
    out, P, (fill, split) = split_forward(q, k, v, params, m, pv_dtype=pv)
    ref, ref_mask, idx, sb = reference_split_call(q, k, v, params, m, pv_dtype=pv_ref)
    assert torch.equal(P["block_mask"].to_dense(), ref_mask)
    finite = torch.isfinite(sb)
    assert finite.any() and torch.equal(split[1][..., :sb.shape[-1]].isfinite(), finite)
    assert torch.equal(split[0][..., :idx.shape[-1]].long()[finite], idx[finite])
    assert rel_l1(out, ref.to(out.dtype)) < 0.01
    plain = sparse_attention_reference(q, k, v, ref_mask, params, BQ, BK, fill=stage1(q, k, params)[1],
                                       pv_dtype=pv_ref)[0]
    assert rel_l1(ref, plain) > 0.02


def test_split_inputs_are_checked():
    q, k, v = clustered(1, 2, 300, 64, seed=1, Hkv=2, dtype=torch.bfloat16)
    params = SpargeParams(simthreshd1=-1.0, minshare=2.0, scoring="lse", fill_skipped=True)
    _, P, (fill, split) = split_forward(q, k, v, params, 2)
    from sparge_attention.kernels.fill_pass import check_split

    args = (fill[4].shape[-1], P["v_t"], 1, 2, 2, 5, 64, 300, BK, fill[0])
    check_split(split, *args)
    with pytest.raises(ValueError, match="fill_split wants"):
        check_split((split[0].long(),) + split[1:], *args)
    with pytest.raises(ValueError, match="fill_split wants"):
        check_split((split[0][..., :16].contiguous(), split[1][..., :16].contiguous()) + split[2:], *args)
    with pytest.raises(ValueError, match="needs fill"):
        check_split(split, 0, *args[1:])
    with pytest.raises(ValueError, match="fill_skipped"):
        split_forward(q, k, v, SpargeParams(simthreshd1=-1.0, minshare=2.0, scoring="lse"), 2)
