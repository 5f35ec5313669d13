"""The per-row log-sum-exp that sparge_attention returns with return_lse (for ring attention:
partial outputs over key shards merge by their lse). The reference against exact dense
logsumexp, the Triton kernel against the reference in the CPU interpreter, the dense fallback,
and a two-shard merge against a full call."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from data import clustered  # noqa: E402
from devkit.metrics import rel_l1  # noqa: E402
from devkit.pack import load_pack  # noqa: E402

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402

from sparge_attention.sparge_core import SpargeParams, block_sizes, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.blockmask import num_blocks  # noqa: E402
from sparge_attention.sparge_core.reference import dense_attention, sparge_reference  # noqa: E402
from sparge_attention.sparge_core.reference_quant import (  # noqa: E402
    expand_kv,
    key_mean,
    quantize_int8_per_block,
    smooth_k,
)

INF = float("inf")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RBQ, RBK = block_sizes(torch.device("cpu"), "reference")
ALL_KEPT = SpargeParams(simthreshd1=-1, cdfthreshd=1.0, pvthreshd=INF)
# sparse, with most skipped blocks estimated when fill_skipped (as in tests/test_kernels.py)
SPARSE = dict(simthreshd1=-1.0, minshare=2.0, pvthreshd=INF, scoring="lse")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="kernel tests run in the Triton CPU interpreter")


def dense_lse(q, k, scale=None, causal=False):
    """torch's logsumexp of the scaled fp32 scores (causal: bottom-right aligned, like the kernels)."""
    H, N, Nk = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ expand_kv(k.float(), H).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.arange(Nk)[None, :] > torch.arange(N)[:, None] + (Nk - N), -INF)
    return torch.logsumexp(s, -1)


def offset_keys(q, k, v, amount=3.0):
    """Keys with a large shared offset: the kernels smooth it away, so an lse that forgot to add
    q . mean(k) back would be off by that much."""
    return q, k + amount, v


def merge(o1, l1, o2, l2):
    """The standard merge of two partial attentions over disjoint key sets (a ring step)."""
    lse = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - lse)[..., None], torch.exp(l2 - lse)[..., None]
    return o1.float() * w1 + o2.float() * w2, lse


# ----------------------------------------------------------------------------- reference
def dequantized(x, block):
    """x through the reference's int8 rounding (one scale per block of tokens), back in fp32."""
    xq, xs = quantize_int8_per_block(x, block)
    return xq.float() * xs.repeat_interleave(block, -1)[..., :x.shape[2], None]


def quantized_dense_lse(q, k, causal):
    """Dense logsumexp of the scores the reference computes (int8 q against int8 smoothed keys),
    plus scale * q . key_mean(k), the part the smoothing took out."""
    kmean = key_mean(k.float())
    shift = (q.float() @ expand_kv(kmean, q.shape[1]).transpose(-1, -2))[..., 0] * q.shape[-1] ** -0.5
    return dense_lse(dequantized(q, RBQ), dequantized(smooth_k(k.float()), RBK), causal=causal) + shift


@pytest.mark.parametrize("causal,Hkv,n", [(False, 2, 300), (True, 2, 300), (False, 1, 257)])
def test_reference_lse_keep_all_is_dense_logsumexp(causal, Hkv, n):
    q, k, v = offset_keys(*clustered(1, 2, n, 64, seed=n, Hkv=Hkv, amp=1.0))
    out, mask, _, lse = sparge_reference(q, k, v, ALL_KEPT.replace(is_causal=causal), RBQ, RBK, pv_dtype="fp32",
                                         return_lse=True)
    want = dense_lse(q, k, causal=causal)
    assert lse.shape == (1, 2, n) and lse.dtype == torch.float32
    assert want.abs().mean() > 5  # the offset matters: the smoothing shift is not vacuous
    # the online softmax's bookkeeping is exact for the quantized scores ...
    assert (lse - quantized_dense_lse(q, k, causal)).abs().max() < 1e-4
    # ... and those are the true scores up to int8 quantization
    assert (lse - want).abs().max() < 0.15 and (lse - want).abs().mean() < 0.02


def test_reference_lse_sparse_below_dense_and_fill_raises_it():
    """Dropping blocks removes mass (lse below dense); the estimate adds most of it back."""
    q, k, v = clustered(1, 2, 700, 64, seed=5)
    want = dense_lse(q, k)
    _, mask, _, lse0 = sparge_reference(q, k, v, SpargeParams(**SPARSE), RBQ, RBK, return_lse=True)
    _, _, _, lse1 = sparge_reference(q, k, v, SpargeParams(**SPARSE, fill_skipped=True), RBQ, RBK, return_lse=True)
    assert mask.float().mean() < 0.7
    assert (lse0 < want + 0.25).all() and (want - lse0).mean() > 0.3
    assert (lse1 - want).abs().mean() < 0.5 * (lse0 - want).abs().mean()


def test_api_reference_backend_layout_grid_and_order():
    """NHD inputs and a Hilbert grid: lse comes back (B, H, N) in the caller's token order, and
    return_stats adds stats after it."""
    grid = (2, 6, 20)  # 240 grid tokens + 17 text tokens
    q, k, v = offset_keys(*clustered(1, 2, 257, 64, seed=2))
    out, lse, st = sparge_attention(q, k, v, ALL_KEPT, backend="reference", grid=grid, return_lse=True,
                                    return_stats=True)
    assert st.backend == "reference" and out.shape == q.shape
    assert (lse - dense_lse(q, k)).abs().max() < 0.25  # amp-2 clustered scores: int8 quantization
    # a mix-up of the token order would be far off: rows' lse differ by several units
    assert (lse - dense_lse(q, k)).abs().mean() < 0.05 < (lse.flip(-1) - dense_lse(q, k)).abs().mean()
    nhd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    out2, lse2 = sparge_attention(*nhd, ALL_KEPT, layout="NHD", backend="reference", grid=grid, return_lse=True)
    assert lse2.shape == (1, 2, 257) and torch.allclose(lse2, lse) and torch.allclose(out2.transpose(1, 2), out)
    assert torch.equal(sparge_attention(q, k, v, ALL_KEPT, backend="reference", grid=grid), out)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_fallback_lse_is_exact(causal):
    """A sequence shorter than one query block runs SDPA; its lse is computed exactly (SDPA's
    causal mask is top-left aligned, and so is this lse)."""
    q, k, v = clustered(1, 4, 40, 64, seed=1, Hkv=2, Nk=90 if not causal else 40)
    out, lse, st = sparge_attention(q, k, v, ALL_KEPT.replace(is_causal=causal), backend="reference",
                                    return_lse=True, return_stats=True)
    assert st.backend == "dense"
    torch.testing.assert_close(lse, dense_lse(q, k, causal=causal), rtol=1e-5, atol=1e-5)
    # the lse is what the output was normalized by: exp(s - lse) @ v reproduces it
    s = (q @ expand_kv(k, 4).transpose(-1, -2)) * 64 ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), -INF)
    torch.testing.assert_close(torch.exp(s - lse[..., None]) @ expand_kv(v, 4), out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Triton kernel
def triton_and_reference(q, k, v, params, grid=None, pv_dtype="auto", block_mask=None):
    out, lse, st = sparge_attention(q, k, v, params, backend="triton", grid=grid, pv_dtype=pv_dtype,
                                    block_mask=block_mask, return_lse=True, return_stats=True)
    assert st.backend == "triton"
    rout, rlse = sparge_attention(q, k, v, params, backend="reference", grid=grid, return_lse=True,
                                  pv_dtype="fp16" if pv_dtype == "fp16" else "fp8", block_mask=block_mask)
    return out, lse, rout, rlse, st


@needs_interpreter
@pytest.mark.parametrize("n,Hkv,causal,fill,grid,pv,dtype", [
    (300, 2, False, False, None, "auto", torch.float32),
    (333, 1, False, True, None, "auto", torch.float32),
    (300, 2, True, True, None, "auto", torch.float32),
    (257, 2, False, True, (2, 6, 20), "auto", torch.float32),
    (450, 2, False, True, None, "fp16", torch.float32),
    (300, 2, False, True, None, "auto", torch.bfloat16),
])
def test_triton_lse_matches_reference(n, Hkv, causal, fill, grid, pv, dtype):
    q, k, v = offset_keys(*clustered(1, 4, n, 64, seed=n, Hkv=Hkv, dtype=dtype))
    params = SpargeParams(**SPARSE, is_causal=causal, fill_skipped=fill)
    out, lse, rout, rlse, st = triton_and_reference(q, k, v, params, grid=grid, pv_dtype=pv)
    assert lse.shape == (1, 4, n) and lse.dtype == torch.float32
    assert st.sparsity > 0.2
    assert rel_l1(out, rout) < 0.01
    err = (lse - rlse).abs()
    if dtype == torch.float32:
        assert err.max() < 1e-3
    else:  # bf16 inputs: rounding ties may put an int8 q one step apart, times the key offset
        assert err.mean() < 2e-3 and err.max() < 0.1
    if fill:  # the fill pass's mass is in the lse: without it the value is measurably lower
        _, lse0 = sparge_attention(q, k, v, params.replace(fill_skipped=False), backend="triton", grid=grid,
                                   pv_dtype=pv, return_lse=True)
        assert (lse - lse0).mean() > 0.01


@needs_interpreter
def test_triton_lse_nhd_layout():
    """NHD inputs (strided views inside the call): the same lse, still (B, H, N)."""
    q, k, v = clustered(1, 2, 200, 64, seed=8)
    params = SpargeParams(**SPARSE, fill_skipped=True)
    _, lse = sparge_attention(q, k, v, params, backend="triton", return_lse=True)
    _, lse2 = sparge_attention(*(x.transpose(1, 2).contiguous() for x in (q, k, v)), params, layout="NHD",
                               backend="triton", return_lse=True)
    assert lse2.shape == (1, 2, 200) and torch.equal(lse, lse2)


@needs_interpreter
def test_triton_lse_empty_row_and_keep_all():
    """A query block whose user mask keeps nothing: output 0, lse -inf (it merges with weight 0);
    the other rows keep everything and match dense logsumexp."""
    BQ, BK = block_sizes(torch.device("cpu"), "triton")
    q, k, v = offset_keys(*clustered(1, 2, 200, 64, seed=9))
    mask = torch.ones(1, 2, num_blocks(200, BQ), num_blocks(200, BK), dtype=torch.bool)
    mask[:, :, 1] = False
    out, lse, rout, rlse, _ = triton_and_reference(q, k, v, ALL_KEPT, block_mask=mask)
    rows = torch.arange(200)
    empty = (rows >= BQ) & (rows < 2 * BQ)
    assert torch.isneginf(lse[..., empty]).all() and torch.isneginf(rlse[..., empty]).all()
    assert (out[:, :, empty] == 0).all()
    assert (lse[..., ~empty] - rlse[..., ~empty]).abs().max() < 1e-3
    assert (lse[..., ~empty] - dense_lse(q, k)[..., ~empty]).abs().mean() < 0.05


# ----------------------------------------------------------------------------- ring merge
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_two_key_shards_merge_to_the_full_call(backend):
    """A ring step in miniature: queries against two key shards with different key means, the
    partial (out, lse) merged by the standard rule, reproduce a call over all keys (keep-all):
    the same lse, and an output as close to exact attention as the full call's (each shard is
    quantized on its own, so the two differ by quantization, not more)."""
    q, k, v = clustered(1, 2, 256, 64, seed=4, Nk=320)
    k[:, :, 192:] += 2.0  # the shards' means differ: each is smoothed by its own
    exact = dense_attention(q, k, v)
    full, lse = sparge_attention(q, k, v, ALL_KEPT, backend=backend, return_lse=True)
    o1, l1 = sparge_attention(q, k[:, :, :192], v[:, :, :192], ALL_KEPT, backend=backend, return_lse=True)
    o2, l2 = sparge_attention(q, k[:, :, 192:], v[:, :, 192:], ALL_KEPT, backend=backend, return_lse=True)
    merged, mlse = merge(o1, l1, o2, l2)
    want = dense_lse(q, k)
    assert (mlse - want).abs().mean() < 1.2 * (lse - want).abs().mean() + 0.005
    assert (mlse - lse).abs().max() < 0.25  # int8 quantization of amp-2 clustered scores
    err = rel_l1(merged, exact)
    assert err < 1.2 * rel_l1(full, exact) + 0.002
    # not vacuous: the second shard carries real weight, and a wrong lse shows
    assert torch.exp(l2 - mlse).mean() > 0.1
    bad, _ = merge(o1, l1, o2, l2 + 1.0)
    assert rel_l1(bad, exact) > 2 * err


def test_return_lse_off_returns_what_it_did():
    q, k, v = clustered(1, 2, 200, 64, seed=3)
    out = sparge_attention(q, k, v, ALL_KEPT, backend="reference")
    assert isinstance(out, torch.Tensor)
    out2, st = sparge_attention(q, k, v, ALL_KEPT, backend="reference", return_stats=True)
    assert torch.equal(out, out2) and st.backend == "reference"
    assert math.isfinite(float(st.sparsity))
