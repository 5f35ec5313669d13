"""Fused stage-1 selection: block scores -> kept key blocks -> per-row index list, one program
per (batch, head, query block) row. Replaces a softmax, a sort (CDF / top-k), a cumsum, a scatter
and the compaction pass with one launch. Twin of sparge_core.reference.keep_from_scores/select_blocks."""
import torch
import triton
import triton.language as tl


@triton.jit
def _select_kernel(S, QSS, KSS, PARAM, CNT, IDX, NQ, NK, H, n_q, n_k, block_q, block_k,
                   NK_POW2: tl.constexpr, MODE: tl.constexpr, HAS_KSS: tl.constexpr,
                   SINK: tl.constexpr, CAUSAL: tl.constexpr):
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


_MODES = {"cdf": 0, "topk": 1, "share": 2}


def select_blocks_fused(scores: torch.Tensor, q_ss: torch.Tensor, k_ss, param: torch.Tensor, mode: str,
                        sink: bool, causal: bool, n_q: int, n_k: int, block_q: int, block_k: int):
    """scores (B,H,NQ,NK) fp32 log2 units; q_ss (B,H,NQ) bool; k_ss (B,H,NK) bool or None;
    param (H,) fp32: cdfthreshd, topk or minshare for mode "cdf", "topk" or "share".
    Returns counts (B,H,NQ) int32, indices (B,H,NQ,NK) int32."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    if scores.dim() != 4 or scores.dtype != torch.float32:
        raise ValueError("scores must be fp32 (B, H, NQ, NK)")
    B, H, NQ, NK = scores.shape
    if q_ss.shape != (B, H, NQ) or (k_ss is not None and k_ss.shape != (B, H, NK)) or param.shape != (H,):
        raise ValueError("similarity flags or per-head parameters do not match the scores")
    scores = scores.contiguous()
    counts = torch.empty(B, H, NQ, dtype=torch.int32, device=scores.device)
    idx = torch.empty(B, H, NQ, NK, dtype=torch.int32, device=scores.device)
    qss = q_ss.to(torch.int8).contiguous()
    kss = k_ss.to(torch.int8).contiguous() if k_ss is not None else qss
    _select_kernel[(B * H * NQ,)](
        scores, qss, kss, param.float().contiguous(), counts, idx, NQ, NK, H, n_q, n_k, block_q, block_k,
        NK_POW2=triton.next_power_of_2(NK), MODE=_MODES[mode], HAS_KSS=k_ss is not None, SINK=sink, CAUSAL=causal,
        num_warps=4 if NK <= 1024 else 8,
    )
    return counts, idx
