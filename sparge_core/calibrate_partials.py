"""Calibration step 2: per-row block partials, every candidate's output, and its error.

For the sampled query rows, the quantized scores against EVERY key are computed once (int8 Q
and smoothed int8 K, the reference's rounding) and reduced per key block j to (block max m_j,
block exp-sum l_j, block P.V partial o_j), with P rounded to the backend's P.V dtype and V
quantized per channel. The output of ANY block mask for those rows is then an exact
log-sum-exp combination of the kept blocks' partials:

    O = sum_j w_j o_j / sum_j w_j l_j,   w_j = exp2(m_j - max_kept m)   (w_j = 0 if j is skipped)

so all candidates cost one dense pass over the sampled rows plus a cheap combination. (The
kernel rounds P with its running max, this uses the block max: the same relative rounding, the
same statistics; with fp32 P.V the two agree to fp32 round-off.) Each candidate's output is
compared with fp32-accurate dense attention of the same rows (`truth_rows`), and the absolute
error and |truth| are summed per sampled query block: the input of step 3 (calibrate_stats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import torch

from .api import resolve_backend
from .calibrate_masks import CallBlocks
from .reference_predict import block_means, fill_logits
from .reference_quant import LOG2E, P_SCALE_FP8, TINY, quantize_int8_per_block, quantize_v, round_p, split_blocks

_CHUNK_ELEMS = 1 << 26  # fp32 elements of per-chunk work buffers (~256 MB)
_OUT_DTYPE_OK: Dict[str, bool] = {}


def pv_dtype_for(device: torch.device, backend: str, pv_dtype: str) -> str:
    """The P.V rounding of the kernel the calibration is for: fp8 on the Triton backend of
    fp8-capable GPUs, fp16 otherwise (what sparge_attention's reference backend uses)."""
    if pv_dtype != "auto":
        if pv_dtype not in ("fp8", "fp16", "fp32"):
            raise ValueError(f"pv_dtype must be auto, fp8, fp16 or fp32, got {pv_dtype!r}")
        return pv_dtype
    if resolve_backend(device, backend) == "triton":
        from ..kernels.config import default_config

        return "fp8" if default_config(device).pv_fp8 else "fp16"
    return "fp16"


def _has_out_dtype(dev) -> bool:
    """torch.mm(..., out_dtype=torch.float32) for half inputs (fp32 accumulation and output)."""
    key = str(dev)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(16, 16, device=dev, dtype=torch.bfloat16)
            _OUT_DTYPE_OK[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _OUT_DTYPE_OK[key] = False
    return _OUT_DTYPE_OK[key]


@dataclass(frozen=True)
class _Numerics:
    """How this device computes the step: exact int8 matmuls (CUDA _int_mm), half P.V with
    fp32 accumulation, the split truth; and the kernel's P.V and output dtypes."""

    pv_dtype: str
    out_dtype: torch.dtype
    int_mm: bool
    half_pv: bool
    split: bool
    fill: bool

    @classmethod
    def for_call(cls, q, pv_dtype: str, fill: bool) -> "_Numerics":
        cuda = q.device.type == "cuda"
        return cls(pv_dtype=pv_dtype, out_dtype=q.dtype,
                   int_mm=cuda and hasattr(torch, "_int_mm") and q.shape[-1] % 8 == 0,
                   half_pv=cuda and pv_dtype != "fp32",
                   split=cuda and q.dtype in (torch.float16, torch.bfloat16) and _has_out_dtype(q.device),
                   fill=fill)


@dataclass
class _KeyHead:
    """One key/value head's operands as the kernel sees them: int8 K (padded to whole blocks)
    with its per-column scale, V quantized per channel in blocks (NK, BK, D) with its scale,
    K and V for the truth, and (fill) the blocks' mean key, mean value and keys' variances."""

    kq: torch.Tensor
    ksc: torch.Tensor
    kd: Optional[torch.Tensor]
    vq: torch.Tensor
    vscale: torch.Tensor
    kt: torch.Tensor
    vt: torch.Tensor
    kbar: Optional[torch.Tensor] = None
    vbar: Optional[torch.Tensor] = None
    kvar: Optional[torch.Tensor] = None


class _HeadRows(NamedTuple):
    """The sampled rows of one (batch, head): q as given (for the truth), int8 q with its
    per-row scale in log2 units, row validity, the candidate masks (X, Sq, NK) and the fill
    bias (Sq, NK) or None."""

    q: torch.Tensor
    q_i8: torch.Tensor
    qs: torch.Tensor
    valid: torch.Tensor
    masks: torch.Tensor
    bias: Optional[torch.Tensor]


def truth_rows(q_rows, k, v, scale: float, split: bool):
    """Dense attention of some query rows against all keys, to fp32 accuracy.

    split=False: fp32 SDPA on upcast inputs. split=True (CUDA, fp16/bf16 inputs): the same result
    on the tensor cores: the products of half inputs are exact in fp32, so Q K^T is one half
    matmul with fp32 output; P (fp32) is split into hi + lo halves (22 significant bits) for P V.
    (Plain half SDPA would not do: it rounds P and the output to half, and that rounding
    correlates with the rounding of the output under test, which biases the error low.)"""
    if not split:
        ref = torch.nn.functional.scaled_dot_product_attention(
            q_rows.float()[None, None], k[None, None], v[None, None], scale=scale)
        return ref[0, 0]
    p = torch.softmax(torch.mm(q_rows, k.T, out_dtype=torch.float32).mul_(scale), dim=-1)
    hi = p.to(v.dtype)
    lo = p.sub_(hi).to(v.dtype)
    return torch.mm(hi, v, out_dtype=torch.float32).add_(torch.mm(lo, v, out_dtype=torch.float32))


def _block_pv(p, vq, pv_dtype: str, half: bool):
    """Per key block, P (rounded as the kernel rounds it) times quantized V: (R, NK, BK) x
    (NK, BK, D) -> (R, NK, D) fp32. On CUDA the rounded operands are exact in fp16, so the
    product runs in fp16 with fp32 accumulation. For fp8, `vq` must come divided by
    P_SCALE_FP8 (exact in fp16), so P stays in its stored scale: fp8(P * 256) (<= 256)."""
    if not half:
        return torch.bmm(round_p(p, pv_dtype).transpose(0, 1), vq).transpose(0, 1).contiguous()
    pr = (p * P_SCALE_FP8).to(torch.float8_e4m3fn).to(torch.float16) if pv_dtype == "fp8" else p.to(torch.float16)
    pt = pr.transpose(0, 1)
    try:
        o = torch.bmm(pt, vq, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        o = torch.bmm(pt, vq).float()
    return o.transpose(0, 1).contiguous()


def block_partials(qd, q_i8, qs, kv: _KeyHead, blocks: CallBlocks, num: _Numerics):
    """Per sampled row r and key block j: m_rj = max score, l_rj = sum exp2(score - m_rj) and
    o_rj = P.V partial (rounded P times quantized V), scores in log2 units. Keys past N score
    -inf. qd: the dequantized rows (q_i8 * qs), needed off CUDA. Returns m, l (R, NK), o (R, NK, D)."""
    N, NK, BK = blocks.n, blocks.nk, blocks.block_k
    if num.int_mm:  # integer tensor cores: exact int32 sums, then the scales
        s = torch._int_mm(q_i8.contiguous(), kv.kq.T)
        s = torch.mul(s, qs[:, None]).mul_(kv.ksc[None, :])
    else:
        s = qd @ kv.kd.T
    if NK * BK > N:
        s[:, N:] = -math.inf
    s = s.view(s.shape[0], NK, BK)
    m = s.amax(-1)
    p = torch.exp2(s.sub_(m[..., None]), out=s)
    return m, p.sum(-1), _block_pv(p, kv.vq, num.pv_dtype, num.half_pv)


def combine_candidates(m, lsum, o, keep, vscale, fill_t=None, vbar=None):
    """Every candidate's output for the rows from the block partials: O = sum_j w_j o_j /
    sum_j w_j l_j over the kept blocks, times V's per-channel scale. keep: (R, X, NK) bool.

    fill_t (R, NK): the fill pass; each skipped block then adds one estimated key of score t
    (log2 units), exp-sum 1 and value vbar (NK, D). Returns (R, X, D) fp32."""
    w = torch.where(keep, m[:, None, :], torch.full((), -math.inf, device=m.device))
    if fill_t is None:
        w = torch.exp2(w.sub_(w.amax(-1, keepdim=True)), out=w)  # 0 where not kept
        lt = torch.bmm(w, lsum[:, :, None])  # (R, X, 1)
        return torch.bmm(w, o).div_(lt.clamp_min_(TINY)).mul_(vscale)
    wf = torch.where(keep, torch.full((), -math.inf, device=m.device), fill_t[:, None, :])
    top = torch.maximum(w.amax(-1, keepdim=True), wf.amax(-1, keepdim=True))
    wf = torch.exp2(wf.sub_(top), out=wf)
    w = torch.exp2(w.sub_(top), out=w)
    lt = torch.bmm(w, lsum[:, :, None]) + wf.sum(-1, keepdim=True)
    return (torch.bmm(w, o) + wf @ vbar).div_(lt.clamp_min_(TINY)).mul_(vscale)


def _key_head(k, v, k_i8, ks_cols, means, b: int, hk: int, blocks: CallBlocks, num: _Numerics) -> _KeyHead:
    """The operands of kv head (b, hk). For fp8 P.V in half, V is divided by 256 (exact) so
    that P can stay at its stored scale fp8(P * 256)."""
    kq, ksc = k_i8[b, hk], ks_cols[b, hk]  # (NKp, D) int8, (NKp,)
    vq, vscale = quantize_v(v[b:b + 1, hk:hk + 1], num.pv_dtype)
    vq = split_blocks(vq, blocks.block_k)[0, 0]  # (NK, BK, D) fp32
    if num.half_pv:
        vq = (vq / P_SCALE_FP8 if num.pv_dtype == "fp8" else vq).half()
    kt, vt = (k[b, hk], v[b, hk]) if num.split else (k[b, hk].float(), v[b, hk].float())
    kbar, vbar, kvar = (m[b, hk] for m in means) if means is not None else (None, None, None)
    return _KeyHead(kq=kq, ksc=ksc, kd=None if num.int_mm else kq.float() * ksc[:, None], vq=vq,
                    vscale=vscale[0, 0], kt=kt, vt=vt, kbar=kbar, vbar=vbar, kvar=kvar)


def _chunk_errors(rows: _HeadRows, sl: slice, kv: _KeyHead, blocks: CallBlocks, num: _Numerics):
    """Errors of query blocks `sl` of one (batch, head): sum over each block's real rows of
    |O_x - O_ref| per candidate x (X, nb), and of |O_ref| (nb,)."""
    BQ = blocks.block_q
    r = slice(sl.start * BQ, sl.stop * BQ)
    nb, R = sl.stop - sl.start, (sl.stop - sl.start) * BQ
    q_i8, qs = rows.q_i8[r], rows.qs[r]
    qd = q_i8.float() * qs[:, None] if not num.int_mm else None
    m, lsum, o = block_partials(qd, q_i8, qs, kv, blocks, num)
    ref = truth_rows(rows.q[r], kv.kt, kv.vt, blocks.scale, num.split)
    rvf = rows.valid[r].to(ref.dtype)
    den = (ref.abs().sum(-1) * rvf).view(nb, BQ).sum(-1)
    X, NK = rows.masks.shape[0], blocks.nk
    keep = rows.masks[:, sl].permute(1, 0, 2)[:, None].expand(nb, BQ, X, NK).reshape(R, X, NK)
    fill_t = None
    if num.fill:  # the estimated key's score (reference_predict.fill_logits)
        fill_t = fill_logits(q_i8.float().view(nb, BQ, -1), qs.view(nb, BQ)[:, 0], kv.kbar, kv.kvar, rows.bias[sl],
                             rows.valid[r].view(nb, BQ).sum(-1).clamp_min(1)).view(R, -1)
    out = combine_candidates(m, lsum, o, keep, kv.vscale, fill_t, kv.vbar)
    out = out.to(num.out_dtype).float()  # the kernel stores the output in q's dtype
    e = (out.sub_(ref[:, None, :])).abs_().sum(-1) * rvf[:, None]  # (R, X)
    return e.view(nb, BQ, X).sum(1).T, den


def _chunk_blocks(blocks: CallBlocks, X: int, D: int, num: _Numerics, on_cuda: bool) -> int:
    """Query blocks per chunk, so that the chunk's work buffers hold about _CHUNK_ELEMS (x4 on CUDA)."""
    NK = blocks.nk
    per_row = 4 * NK * blocks.block_k + 2 * NK * D + 3 * X * NK + 2 * X * D + ((X + 1) * NK if num.fill else 0)
    return max(1, (_CHUNK_ELEMS * (4 if on_cuda else 1)) // (blocks.block_q * per_row))


def sampled_block_errors(q_rows, row_valid, k, v, k_i8, k_scale, masks, fill_bias, blocks: CallBlocks,
                         pv_dtype: str, kbar, kvar):
    """Per candidate, head and sampled query block: num = sum over the batch and the block's
    rows of sum_d |O_x - O_ref| (X, H, Sq), and den = the same of |O_ref| (H, Sq), fp64.

    q_rows (B, H, Sq*BQ, D) and row_valid from calibrate_masks.sampled_rows; k_i8, k_scale:
    the smoothed K in int8 blocks; masks (X, B, H, Sq, NK); fill_bias (B, H, Sq, NK), kbar (the
    fill estimate's mean keys, mean_keys_i8's answer) and kvar (its keys' grouped variances,
    key_variances'), or None for all three without the estimate.
    Q is quantized per block exactly as in the full call (the same blocks, the same scales)."""
    B, H, _, D = q_rows.shape
    Hkv, BQ, BK = k.shape[1], blocks.block_q, blocks.block_k
    X, Sq = masks.shape[0], masks.shape[3]
    fill = kbar is not None
    num = _Numerics.for_call(q_rows, pv_dtype, fill)
    q_i8, q_scale = quantize_int8_per_block(q_rows, BQ)
    qs_rows = (q_scale * (blocks.scale * LOG2E)).repeat_interleave(BQ, dim=2)  # (B, H, Sq*BQ), log2 units
    k_i8 = torch.nn.functional.pad(k_i8, (0, 0, 0, blocks.nk * BK - blocks.n))
    ks_cols = k_scale.repeat_interleave(BK, dim=2)  # (B, Hkv, NK*BK)
    # the kernel's mean keys and values, and the keys' variances
    means = (*block_means(k, v, BK, pv_dtype, kbar), kvar) if fill else None
    num_blk = torch.zeros(X, H, Sq, dtype=torch.float64, device=q_rows.device)
    den_blk = torch.zeros(H, Sq, dtype=torch.float64, device=q_rows.device)
    chunk = _chunk_blocks(blocks, X, D, num, q_rows.device.type == "cuda")
    for b in range(B):
        for hk in range(Hkv):
            kv = _key_head(k, v, k_i8, ks_cols, means, b, hk, blocks, num)
            for h in range(hk * (H // Hkv), (hk + 1) * (H // Hkv)):
                rows = _HeadRows(q_rows[b, h], q_i8[b, h], qs_rows[b, h], row_valid, masks[:, b, h],
                                 None if fill_bias is None else fill_bias[b, h])
                _head_errors(rows, kv, blocks, num, chunk, num_blk[:, h], den_blk[h])
    return num_blk, den_blk


def _head_errors(rows: _HeadRows, kv: _KeyHead, blocks: CallBlocks, num: _Numerics, chunk: int, num_h, den_h) -> None:
    """Add one (batch, head)'s per-block errors into num_h (X, Sq) and den_h (Sq,), chunk by chunk."""
    Sq = num_h.shape[1]
    for c0 in range(0, Sq, chunk):
        sl = slice(c0, min(Sq, c0 + chunk))
        e, den = _chunk_errors(rows, sl, kv, blocks, num)
        num_h[:, sl] += e
        den_h[sl] += den
