"""Fused stage-1 selection: block scores -> kept key blocks -> per-row index list, one program
per (batch, head, query block) row. Replaces a softmax, a sort (CDF / top-k), a cumsum, a scatter
and the compaction pass with one launch. Twin of sparge_core.reference_predict.keep_from_scores/select_blocks."""
import torch
import triton
import triton.language as tl

from .config import Launch, helper_launch
from .host_math import next_pow2
from .launch import Kernel


@triton.jit
def _select_kernel(S, QSS, KSS, PARAM, CNT, IDX, MEAN, BIAS, NQ, NK, NKC, H, n_q, n_k, block_q, block_k,
                   NK_POW2: tl.constexpr, MODE: tl.constexpr, HAS_QSS: tl.constexpr, HAS_KSS: tl.constexpr,
                   SINK: tl.constexpr, CAUSAL: tl.constexpr, FILL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = row % NQ
    bh = row // NQ
    h = bh % H
    offs = tl.arange(0, NK_POW2)
    valid = offs < NK
    s = tl.load(S + row * NK + offs, mask=valid, other=float("-inf"))
    if CAUSAL:
        last_q = tl.minimum((i + 1) * block_q, n_q) - 1 + (n_k - n_q)
        allowed = valid & (offs * block_k <= last_q)
        s = tl.where(allowed, s, float("-inf"))
    else:
        allowed = valid
    m = tl.max(s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m)
    p = p / tl.maximum(tl.sum(p, 0), 1e-20)
    thr_param = tl.load(PARAM + h)
    n_valid = tl.sum(allowed.to(tl.float32), 0)
    if MODE == 2:  # share: no sort; p * n >= minshare (no division: it rounds alike everywhere)
        keep = (p * n_valid >= thr_param) | (p >= tl.max(p, 0))  # the top block always passes
    else:
        ps = tl.sort(p, 0, descending=True)
        if MODE == 0:  # CDF
            # tau >= 1 keeps every block, even where the fp32 running sum reaches 1.0 early
            tau = tl.where(thr_param >= 1.0, float("inf"), thr_param)
            kept_sorted = (tl.cumsum(ps, 0) - ps) < tau
        else:  # top-k
            n_keep = tl.maximum(tl.ceil(thr_param * n_valid - 1e-3), 1.0)
            kept_sorted = offs.to(tl.float32) < n_keep
        kept_sorted = kept_sorted | (offs == 0)
        thr = tl.min(tl.where(kept_sorted, ps, float("inf")), 0)
        keep = p >= thr
    if HAS_QSS:
        if tl.load(QSS + row) == 0:  # a query block its mean does not represent attends densely
            keep = keep | valid
    if HAS_KSS:
        kss = tl.load(KSS + bh * NK + offs, mask=valid, other=1)
        keep = keep | (kss == 0)
    if SINK:
        keep = keep | (offs == 0)
    keep = keep & allowed
    k32 = keep.to(tl.int32)
    pos = tl.cumsum(k32, 0) - k32
    tl.store(IDX + row * NK + pos, offs, mask=keep)
    tl.store(CNT + row, tl.sum(k32, 0))
    if FILL:  # the skipped-block estimate's bias (reference_predict.fill_bias); kept blocks get -inf
        mean = tl.load(MEAN + row * NK + offs, mask=valid, other=0.0)
        est = valid & ~keep
        if CAUSAL:  # only blocks wholly in the past of the block's first row
            est = est & ((offs + 1) * block_k - 1 <= i * block_q + (n_k - n_q))
        # s is the loaded score wherever est holds (the causal -inf only hits blocks est excludes)
        tl.store(BIAS + row * NKC + offs, tl.where(est, s - mean, float("-inf")), mask=offs < NKC)


_select = Kernel(_select_kernel)


_MODES = {"cdf": 0, "topk": 1, "share": 2}


def select_blocks_fused(scores: torch.Tensor, q_ss: torch.Tensor, k_ss, param: torch.Tensor, mode: str,
                        sink: bool, causal: bool, n_q: int, n_k: int, block_q: int, block_k: int,
                        fill_mean: torch.Tensor | None = None, fill_blocks: int = 0, launch: Launch | None = None):
    """scores (B,H,NQ,NK) fp32 log2 units; q_ss (B,H,NQ) bool or None (every query block
    self-similar: no launches for an all-true mask); k_ss (B,H,NK) bool or None;
    param (H,) fp32: cdfthreshd, topk or minshare for mode "cdf", "topk" or "share".
    Returns counts (B,H,NQ) int32, indices (B,H,NQ,NK) int32; with fill_mean (the mean scores of
    block_lse_scores) also the fill_skipped bias (B,H,NQ,fill_blocks) fp32, -inf past NK.
    `launch`: the fewest warps per row (speed only): a row of up to 1,024 padded key blocks takes
    one warp per 512 of them at least, a longer one 8 (the sorting modes' shared memory needs them)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    if scores.dim() != 4 or scores.dtype != torch.float32:
        raise ValueError("scores must be fp32 (B, H, NQ, NK)")
    B, H, NQ, NK = scores.shape
    if ((q_ss is not None and q_ss.shape != (B, H, NQ)) or (k_ss is not None and k_ss.shape != (B, H, NK))
            or param.shape != (H,)):
        raise ValueError("similarity flags or per-head parameters do not match the scores")
    scores = scores.contiguous()
    counts = torch.empty(B, H, NQ, dtype=torch.int32, device=scores.device)
    idx = torch.empty(B, H, NQ, NK, dtype=torch.int32, device=scores.device)
    qss = q_ss.to(torch.int8).contiguous() if q_ss is not None else scores
    kss = k_ss.to(torch.int8).contiguous() if k_ss is not None else scores
    fill = fill_mean is not None
    if fill and (fill_mean.shape != scores.shape or fill_mean.dtype != torch.float32 or fill_blocks < NK):
        raise ValueError("fill_mean must be fp32 like the scores, and fill_blocks >= the key blocks")
    bias = torch.empty(B, H, NQ, fill_blocks, dtype=torch.float32, device=scores.device) if fill else scores
    width = next_pow2(max(NK, fill_blocks))
    least = (launch or helper_launch("select", scores.device)).num_warps
    warps = min(8, max(least, width // 512)) if width <= 1024 else 8
    _select[(B * H * NQ,)](
        scores, qss, kss, param.float().contiguous(), counts, idx,
        fill_mean.contiguous() if fill else scores, bias, NQ, NK, fill_blocks, H, n_q, n_k, block_q, block_k,
        NK_POW2=width, MODE=_MODES[mode], HAS_QSS=q_ss is not None, HAS_KSS=k_ss is not None,
        SINK=sink, CAUSAL=causal, FILL=fill, num_warps=warps,
    )
    return (counts, idx, bias) if fill else (counts, idx)
