"""Per-head threshold calibration against a measured error, in about the time of a sampling run.

The reference's "tune mode" bisects thresholds per layer and head by running the whole sparse
kernel again and again. Here one attention call is calibrated in ONE pass over a sample of
query blocks:

1. Stage 1 (block scores, for every head at once) is computed only for the sampled query
   blocks; the block mask of every candidate threshold (and similarity threshold) is derived
   from the same scores with the reference's own selection code (`select_blocks`), so the
   candidates mean exactly what the kernel will do with them.
2. For the sampled query rows, the quantized scores against EVERY key are computed once
   (int8 Q and smoothed int8 K, the reference's rounding) and reduced per key block to
   (block max m, block exp-sum l, block P.V partial o) with P rounded to the P.V dtype of the
   backend (fp8 on GPUs with fp8 tensor cores, fp16 otherwise) and V quantized per channel.
   The output of ANY block mask for those rows is then an exact log-sum-exp combination of
   the kept blocks' partials: O = sum_j w_j o_j / sum_j w_j l_j, w_j = exp2(m_j - max_kept m).
   So all candidates cost one dense pass over the sampled rows plus a cheap combination.
   (The kernel rounds P with its running max, this uses the block max: the same relative
   rounding, the same statistics; with fp32 P.V the two agree to fp32 round-off.)
3. The truth is dense attention of the same rows against all keys to fp32 accuracy (on CUDA
   with half inputs: exact half products with fp32 output, P split into hi+lo halves).
4. Per head, the loosest candidate whose sampled rel-L1 (sum|o - o_ref| / sum|o_ref|) is
   <= target AND stays <= target for every tighter candidate (robust to a non-monotone
   error curve) wins; among similarity thresholds the sparsest wins. Heads whose best
   sparsity is < 10% (or that cannot reach the target at all, e.g. quantization alone is
   above it) are marked dense.

Cost, per call, against dense attention (4*B*H*N^2*D FLOPs). With R = sample_query_blocks *
BLKQ sampled rows: int8 Q K^T + P.V partials (4*R*N*D) + truth Q K^T and hi/lo P.V (6*R*N*D)
+ the candidate combination (2*X*R*(N/BLKK)*D, X = configs + 1) + stage 1 of the sampled blocks
(2*(R/BLKQ)*N*D): about (2.5 + X/(2*BLKK)) * R/N of dense, i.e. 0.17x dense FLOPs at Wan 480p
with 32 blocks (R/N = 2048/32760) and 0.08x with 16. It is memory-bound instead (~25 passes over
R x N fp32 score matrices): measured on an H100 at Wan 480p (12 x 32,760 x 128, bf16, Hilbert
order), 5.5x / 3.1x / 1.9x the time of one dense bf16 SDPA call for 32 / 16 / 8 sampled blocks,
at batch 1 and 2 alike.

`Calibrator` accumulates calls per (layer, head) across sampling steps and turns them into a
`SpargeProfile` (profiles.py). Pure PyTorch; runs on any device.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .api import _resolve_backend, block_sizes, validate_qkv
from .blockmask import num_blocks
from .params import SCORINGS, SpargeParams
from .reference import (
    LOG2E,
    P_SCALE_FP8,
    TINY,
    block_lse_scores,
    block_means,
    expand_kv,
    pool_and_similarity,
    quantize_int8_per_block,
    quantize_v,
    round_p,
    select_blocks,
    smooth_k,
    split_blocks,
)

# Candidates cost little (one mask + one combination each); a fine grid lands close to the target.
DEFAULT_CDF_CANDIDATES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95,
                          0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995, 1.0)
DEFAULT_TOPK_CANDIDATES = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.25, 0.28, 0.3, 0.33,
                           0.36, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
DENSE_BELOW = 0.10  # a head whose best sparsity at the target is below this runs dense
# the query-side similarity rule: -1 = off. With "lse" scoring the key side is exact, so the
# rule only forces poorly summarised query blocks dense; trying 0.3 as well costs almost nothing.
DEFAULT_SIM_CANDIDATES = {"lse": (-1.0, 0.3), "pooled": (-1.0, 0.3, 0.6)}
DENSE_THRESHOLD = 1.0  # the dense heads' cdfthreshd/topk
DENSE_SIMTHRESHD1 = 1.0  # no block is "self-similar" above 1: every query block keeps every key block
COMBINE_POLICIES = ("max", "quantile", "mean")
_CHUNK_ELEMS = 1 << 26  # fp32 elements of per-chunk work buffers (~256 MB)


def default_candidates(mode: str) -> tuple:
    if mode == "cdf":
        return DEFAULT_CDF_CANDIDATES
    if mode == "topk":
        return DEFAULT_TOPK_CANDIDATES
    raise ValueError(f"mode must be 'cdf' or 'topk', got {mode!r}")


def _check_candidates(name: str, values, lo: float, lo_open: bool) -> torch.Tensor:
    t = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if torch.isnan(t).any() or (t > 1).any() or ((t <= lo) if lo_open else (t < lo)).any():
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, 1], got {t.tolist()}")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing (loosest first), got {t.tolist()}")
    return t.float()


def pick_configs(err: torch.Tensor, density: torch.Tensor, target_l1: float, dense_below: float = DENSE_BELOW):
    """Choose per head from error / density curves over (sim candidate, threshold candidate).

    err, density: (S, C, H); thresholds ordered loosest first. For each similarity candidate the
    loosest threshold c such that err <= target at c AND at every tighter candidate; then the
    similarity candidate with the highest sparsity (ties: the earlier one).
    Returns sim_idx (H,), cand_idx (H,), dense (H,) bool, sparsity (H,), err (H,) (the latter two
    at the choice; for dense heads sparsity 0 and err NaN, the caller fills in the floor)."""
    S, C, H = err.shape
    worst_tighter = err.flip(1).cummax(1).values.flip(1)  # max over c' >= c
    ok = worst_tighter <= target_l1  # F..F T..T along c
    first_ok = (~ok).sum(1)  # (S, H); == C: unreachable
    reach = first_ok < C
    idx = first_ok.clamp(max=C - 1)
    spars = 1.0 - density.gather(1, idx[:, None, :])[:, 0]  # (S, H)
    spars = torch.where(reach, spars, torch.full_like(spars, -math.inf))
    best = spars.argmax(0)  # first maximum: earlier similarity candidates win ties
    h = torch.arange(H)
    cand = idx[best, h]
    best_sp = spars[best, h]
    dense = ~torch.isfinite(best_sp) | (best_sp < dense_below)
    chosen_err = err[best, cand, h]
    sparsity = torch.where(dense, torch.zeros_like(best_sp), best_sp)
    chosen_err = torch.where(dense, torch.full_like(chosen_err, math.nan), chosen_err)
    return best, cand, dense, sparsity, chosen_err


def allocate_layer(err: torch.Tensor, density: torch.Tensor, weight: torch.Tensor, target_l1: float,
                   dense_below: float = DENSE_BELOW):
    """Choose per head so that the LAYER's error meets the target: sum_h err_h * weight_h <=
    target * sum_h weight_h (weight = sum |o_ref| of the head, so this is the rel-L1 of the whole
    output), maximising the total sparsity. Heads then get different errors: a head whose
    sparsity is cheap in error gives up more, a diffuse head less.

    Greedy multiple-choice knapsack: every head starts at its most accurate option; repeatedly
    the move with the best (sparsity gained) / (error added) that still fits the budget is made.
    Error curves are first made monotone along the thresholds (err at c := max over c' >= c),
    as in pick_configs. Same arguments and returns as pick_configs."""
    S, C, H = err.shape
    env = err.flip(1).cummax(1).values.flip(1).reshape(S * C, H)
    gain = (1.0 - density).reshape(S * C, H)
    w = weight.double().clamp_min(0)
    cost = env.double() * w
    gain = gain.double()
    h = torch.arange(H)
    # the most accurate option of each head (ties: the sparser one)
    order = cost - 1e-12 * gain
    cur = order.argmin(0)
    budget = float(target_l1) * float(w.sum())
    feasible = float(cost[cur, h].sum()) <= budget
    if feasible:
        for _ in range(S * C * H):
            used = float(cost[cur, h].sum())
            dc = cost - cost[cur, h]
            dg = gain - gain[cur, h]
            fits = (dg > 1e-12) & (dc <= budget - used + 1e-15)
            if not bool(fits.any()):
                break
            ratio = torch.where(dc <= 0, torch.full_like(dc, math.inf), dg / dc.clamp_min(1e-300))
            ratio = torch.where(fits, ratio, torch.full_like(ratio, -1.0))
            best = int(ratio.argmax())
            cur[best % H] = best // H
    si, ci = cur // C, cur % C
    sp = gain[cur, h].float()
    dense = (sp < dense_below) | (not feasible)
    chosen_err = torch.where(dense, torch.full((H,), math.nan), err[si, ci, h])
    return si, ci, dense, torch.where(dense, torch.zeros_like(sp), sp), chosen_err


BUDGETS = ("head", "layer")


def _choose(budget: str, bound, density, weight, target_l1, dense_below):
    if budget == "head":
        return pick_configs(bound, density, target_l1, dense_below)
    return allocate_layer(bound, density, weight, target_l1, dense_below)


def _per_head_params(mode: str, scoring: str, threshold, simthreshd1, pvthreshd, dense,
                     attention_sink: bool = False, is_causal: bool = False, fill_skipped: bool = False) -> SpargeParams:
    thr = torch.where(dense, torch.full_like(threshold, DENSE_THRESHOLD), threshold).float()
    sim = torch.where(dense, torch.full_like(simthreshd1, DENSE_SIMTHRESHD1), simthreshd1).float()
    kw = {"cdfthreshd" if mode == "cdf" else "topk": thr}
    return SpargeParams(simthreshd1=sim, pvthreshd=pvthreshd.float(), scoring=scoring,
                        attention_sink=attention_sink, is_causal=is_causal, fill_skipped=fill_skipped, **kw)


@dataclass
class CallCalibration:
    """What calibrate_call measured and chose for one attention call (all tensors on the CPU).

    Curves over (similarity candidate S, threshold candidate C, head H) are kept so that a
    Calibrator can combine calls; the per-head choice is in threshold/simthreshd1/dense."""

    mode: str
    scoring: str
    target_l1: float
    candidates: torch.Tensor  # (C,) thresholds, loosest first
    sim_candidates: torch.Tensor  # (S,)
    err: torch.Tensor  # (S, C, H) sampled rel-L1 vs fp32 dense
    err_num: torch.Tensor  # (S, C, H) sum |o - o_ref| over the sampled rows
    err_den: torch.Tensor  # (H,) sum |o_ref| over the sampled rows
    err_var: torch.Tensor  # (S, C, H) sampling variance of err_num (0 when every block was sampled)
    err_se: torch.Tensor  # (S, C, H) standard error of err: sqrt(err_var) / err_den
    z: float  # the choice required err + z * err_se <= target
    density: torch.Tensor  # (S, C, H) kept fraction of the sampled query blocks' key blocks
    floor_l1: torch.Tensor  # (H,) every block kept: quantization error alone
    floor_num: torch.Tensor  # (H,)
    threshold: torch.Tensor  # (H,) chosen cdfthreshd or topk (dense heads: 1.0)
    simthreshd1: torch.Tensor  # (H,) chosen (dense heads: 1.0)
    pvthreshd: torch.Tensor  # (H,) inf: P.V skipping off
    dense: torch.Tensor  # (H,) bool
    sparsity: torch.Tensor  # (H,) sampled sparsity at the choice (dense heads 0)
    rel_l1: torch.Tensor  # (H,) sampled rel-L1 at the choice (dense heads: the floor)
    n_tokens: int
    grid: Optional[tuple]
    block_q: int
    block_k: int
    pv_dtype: str
    sampled_blocks: List[int] = field(default_factory=list)  # query blocks, in kernel token order
    seconds: float = 0.0
    fill_skipped: bool = False  # the errors were measured with the skipped blocks estimated

    @property
    def heads(self) -> int:
        return int(self.dense.numel())

    @property
    def layer_sparsity(self) -> float:
        return float(self.sparsity.mean())

    @property
    def layer_rel_l1(self) -> float:
        """Sampled rel-L1 of the whole call (all heads) at the chosen settings."""
        num = torch.where(self.dense, self.floor_num, self.rel_l1 * self.err_den)
        return float(num.sum() / self.err_den.sum().clamp_min(TINY))

    def params(self, attention_sink: bool = False, is_causal: bool = False) -> SpargeParams:
        """Per-head SpargeParams. Dense heads get threshold 1.0 and simthreshd1 1.0, which makes
        every query block keep every key block (the sparse path then computes them fully)."""
        return _per_head_params(self.mode, self.scoring, self.threshold, self.simthreshd1, self.pvthreshd,
                                self.dense, attention_sink, is_causal, self.fill_skipped)


def _int_scores(q_i8, k_i8, q_scale_rows, k_scale_cols):
    """int8 Q K^T on CUDA through the integer tensor cores (exact int32 sums), then the scales."""
    s = torch._int_mm(q_i8.contiguous(), k_i8.T)
    return torch.mul(s, q_scale_rows[:, None]).mul_(k_scale_cols[None, :])  # int32 * fp32 -> fp32


def _has_out_dtype(dev) -> bool:
    """torch.mm(..., out_dtype=torch.float32) for half inputs (fp32 accumulation and output)."""
    key = str(dev)
    if key not in _OUT_DTYPE_OK:
        _OUT_DTYPE_OK[key] = _probe_out_dtype(dev)
    return _OUT_DTYPE_OK[key]


_OUT_DTYPE_OK: Dict[str, bool] = {}


def _probe_out_dtype(dev) -> bool:
    try:
        a = torch.ones(16, 16, device=dev, dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _truth_rows(q_rows, k, v, scale: float, split: bool):
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
    if half:
        if pv_dtype == "fp8":
            pr = (p * P_SCALE_FP8).to(torch.float8_e4m3fn).to(torch.float16)
        else:
            pr = p.to(torch.float16)
        pt = pr.transpose(0, 1)
        try:
            o = torch.bmm(pt, vq, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            o = torch.bmm(pt, vq).float()
    else:
        o = torch.bmm(round_p(p, pv_dtype).transpose(0, 1), vq)
    return o.transpose(0, 1).contiguous()


def _sample_blocks(nq: int, n: int, generator) -> torch.Tensor:
    """n query blocks, one drawn uniformly from each of n equal strata (stratified: in Hilbert
    order consecutive blocks are neighbours in the video, so the sample covers it evenly)."""
    if n >= nq:
        return torch.arange(nq)
    edges = torch.linspace(0, nq, n + 1, dtype=torch.float64).floor().long()
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (lo + (u * (hi - lo).double()).floor().long()).clamp(max=nq - 1)


def _pv_dtype_for(device: torch.device, backend: str, pv_dtype: str) -> str:
    if pv_dtype != "auto":
        if pv_dtype not in ("fp8", "fp16", "fp32"):
            raise ValueError(f"pv_dtype must be auto, fp8, fp16 or fp32, got {pv_dtype!r}")
        return pv_dtype
    if _resolve_backend(device, backend) == "triton":
        from ..kernels.config import default_config

        return "fp8" if default_config(device).pv_fp8 else "fp16"
    return "fp16"  # what sparge_attention's reference backend uses for "auto"


@torch.no_grad()
def calibrate_call(q, k, v, target_l1: float, *, grid: Optional[Sequence[int]] = None,
                   scale: Optional[float] = None, mode: str = "cdf", scoring: str = "lse",
                   candidates: Optional[Sequence[float]] = None,
                   sim_candidates: Optional[Sequence[float]] = None,
                   sample_query_blocks: int = 32, backend: str = "auto", pv_dtype: str = "auto",
                   generator: Optional[torch.Generator] = None, z: float = 1.0, budget: str = "head",
                   truth: str = "auto", dense_below: float = DENSE_BELOW, fill: bool = False) -> CallCalibration:
    """Calibrate one self-attention call: per head, the loosest threshold whose sampled output
    rel-L1 against fp32 dense attention (quantization included) stays <= target_l1.

    q (B, H, N, D), k and v (B, Hkv, N, D) in raster token order, as sparge_attention takes them;
    grid: the (t, h, w) grid of the first t*h*w tokens; when given, blocks are formed in 3D
    Hilbert order exactly as sparge_attention(grid=...) forms them.
    candidates: thresholds (cdfthreshd or topk), strictly increasing (loosest first).
    sim_candidates: simthreshd1 values to try (-1 = rule off); default (-1, 0.3) for "lse".
    sample_query_blocks: query blocks evaluated (stratified random; all when there are fewer).
    backend: which kernel the result is for; it sets the block sizes and the P.V rounding
        (fp8 on the Triton backend of fp8-capable GPUs, fp16 otherwise; override with pv_dtype).
    generator: a CPU torch.Generator for the sample (default: a fixed seed, 0).
    z: a candidate passes when (sampled rel-L1) + z * (its standard error over the sampled
        blocks) <= target_l1; 0 trusts the point estimate. The reported rel_l1 is the estimate.
    truth: "auto" computes the fp32-accurate reference rows on the tensor cores on CUDA (see
        _truth_rows), "fp32" always with fp32 SDPA (slow on GPUs: ~60% of the time).
    budget: "head": every head's output meets the target on its own (the reference's tuning
        rule); "layer": the whole call's output (all heads) meets it, the error shared out among
        heads where it buys the most sparsity (allocate_layer).
    fill: measure with the skipped blocks estimated (SpargeParams.fill_skipped; "lse" scoring):
        a skipped block j of a sampled row r then contributes the partial (score t_rj = q_r .
        kbar_j + bias_ij, sum 1, value vbar_j) instead of nothing, the kernel's fill pass.
    """
    t0 = time.perf_counter()
    if truth not in ("auto", "fp32"):
        raise ValueError(f"truth must be 'auto' or 'fp32', got {truth!r}")
    validate_qkv(q, k, v)
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Nk != N:
        raise ValueError(f"calibrate_call is for self-attention: q has {N} tokens, k has {Nk}")
    if mode not in ("cdf", "topk"):
        raise ValueError(f"mode must be 'cdf' or 'topk', got {mode!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if fill and scoring != "lse":
        raise ValueError("fill needs 'lse' scoring (the estimate is calibrated by the lse scores)")
    target_l1 = float(target_l1)
    if not (0.0 < target_l1 <= 1.0):
        raise ValueError(f"target_l1 must lie in (0, 1], got {target_l1}")
    if int(sample_query_blocks) < 2:
        raise ValueError(f"sample_query_blocks must be >= 2 (a standard error needs two), got {sample_query_blocks}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if not (math.isfinite(float(z)) and float(z) >= 0):
        raise ValueError(f"z must be a finite number >= 0, got {z}")
    cands = _check_candidates("candidates", default_candidates(mode) if candidates is None else candidates,
                              0.0, lo_open=True)
    sims = _check_candidates("sim_candidates",
                             DEFAULT_SIM_CANDIDATES[scoring] if sim_candidates is None else sim_candidates,
                             -1.0, lo_open=False)
    dev = q.device
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    BQ, BK = block_sizes(dev, backend)
    pvd = _pv_dtype_for(dev, backend, pv_dtype)
    if N < BQ:
        raise ValueError(f"{N} tokens are fewer than one {BQ}-token query block: such calls always run dense")

    if grid is not None:
        from .hilbert import TokenPermutation

        grid = tuple(int(g) for g in grid)
        if math.prod(grid) > N:
            raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but q has {N}")
        perm = TokenPermutation.for_grid(grid, N, device=dev)
        q, k, v = perm.apply(q, 2), perm.apply(k, 2), perm.apply(v, 2)

    NQ, NK = num_blocks(N, BQ), num_blocks(N, BK)
    gen = generator
    if gen is None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0)
    sel = _sample_blocks(NQ, int(sample_query_blocks), gen)
    Sq = sel.numel()
    sel_d = sel.to(dev)

    # the sampled query blocks' tokens, zero padded: (B, H, Sq*BQ, D); every stage-1 and
    # quantization quantity of a query block depends on that block's tokens alone
    tok = (sel_d[:, None] * BQ + torch.arange(BQ, device=dev)[None, :]).reshape(-1)  # (Sq*BQ,)
    row_valid = tok < N
    q_rows = q.index_select(2, tok.clamp(max=N - 1)) * row_valid[:, None].to(q.dtype)
    cnt = row_valid.view(Sq, BQ).sum(-1).to(torch.float32)  # real tokens per sampled block

    # ---- stage 1 for the sampled query blocks, all heads and all candidates at once
    q_pool, q_sim = pool_and_similarity(q_rows, BQ)  # counts every block as full: fix partial ones
    fix = BQ / cnt
    q_pool, q_sim = q_pool * fix[:, None], q_sim * (fix * fix)
    ksm = smooth_k(k.float())
    k_i8, k_scale = quantize_int8_per_block(ksm, BK)
    Sn, C = sims.numel(), cands.numel()
    Xc = Sn * C  # configs (similarity x threshold), stacked along the head axis for one selection
    fill_bias = None
    if scoring == "lse":
        scores = block_lse_scores(q_pool, k_i8, k_scale, scale, N, BK, want_mean=fill)
        if fill:  # the estimate's bias per (sampled query block, key block); -inf where kept, below
            scores, mean_scores = scores
            fill_bias = scores - mean_scores  # (B, H, Sq, NK)
            del mean_scores
        scores = scores.repeat(1, Xc, 1, 1)
        k_pool = k_sim = None
    else:
        scores = None
        k_pool, k_sim = pool_and_similarity(ksm, BK)
        k_pool = expand_kv(k_pool, H).repeat(1, Xc, 1, 1)
        k_sim = expand_kv(k_sim[..., None], H)[..., 0].repeat(1, Xc, 1)
    del ksm
    thr_x = cands.repeat(Sn).repeat_interleave(H)  # head x*H + h of config x = s*C + c
    sim_x = sims.repeat_interleave(C).repeat_interleave(H)
    sel_params = SpargeParams(simthreshd1=sim_x, pvthreshd=math.inf, scoring=scoring,
                              **{"cdfthreshd" if mode == "cdf" else "topk": thr_x})
    masks = select_blocks(q_pool.repeat(1, Xc, 1, 1), q_sim.repeat(1, Xc, 1), k_pool, k_sim, sel_params, scale,
                          N, N, BQ, BK, scores)  # (B, Xc*H, Sq, NK)
    masks = masks.view(B, Xc, H, Sq, NK).permute(1, 0, 2, 3, 4)
    masks = torch.cat([masks, torch.ones_like(masks[:1])])  # + keep everything: the quantization floor
    X = masks.shape[0]
    density = masks.float().mean(dim=(1, 3, 4))  # (X, H)
    del scores, q_pool, q_sim, k_pool, k_sim

    # ---- sampled rows: quantized operands as the kernel sees them, and the fp32 truth
    q_i8, q_scale = quantize_int8_per_block(q_rows, BQ)  # same blocks, same scales as the full call
    qs_rows = (q_scale * (scale * LOG2E)).repeat_interleave(BQ, dim=2)  # (B, H, Sq*BQ)
    NKp = NK * BK
    k_i8 = torch.nn.functional.pad(k_i8, (0, 0, 0, NKp - N))
    ks_cols = k_scale.repeat_interleave(BK, dim=2)  # (B, Hkv, NKp)
    group = H // Hkv
    out_dtype = q.dtype
    cuda = dev.type == "cuda"
    int_mm = cuda and hasattr(torch, "_int_mm") and D % 8 == 0
    half_pv = cuda and pvd != "fp32"
    split = truth == "auto" and cuda and q.dtype in (torch.float16, torch.bfloat16) and _has_out_dtype(dev)

    kbar_all = vbar_all = None
    if fill:  # the kernel's mean keys (int8, dequantized) and mean values (V's units and rounding)
        kbar_all, vbar_all = block_means(k, v, BK, pvd)
    num_blk = torch.zeros(X, H, Sq, dtype=torch.float64, device=dev)  # summed over the batch
    den_blk = torch.zeros(H, Sq, dtype=torch.float64, device=dev)
    per_row = 4 * NKp + 2 * NK * D + 3 * X * NK + 2 * X * D + ((X + 1) * NK if fill else 0)
    chunk = max(1, (_CHUNK_ELEMS * (4 if cuda else 1)) // (BQ * per_row))
    for b in range(B):
        for hk in range(Hkv):
            kq, ksc = k_i8[b, hk], ks_cols[b, hk]  # (NKp, D) int8, (NKp,)
            kd = None if int_mm else kq.float() * ksc[:, None]
            vq, vscale = quantize_v(v[b:b + 1, hk:hk + 1], pvd)
            vq = split_blocks(vq, BK)[0, 0]  # (NK, BK, D) fp32
            if half_pv:  # fp8 P is kept at its stored scale (x256): fold 1/256 into V, exactly
                vq = (vq / P_SCALE_FP8 if pvd == "fp8" else vq).half()
            vscale = vscale[0, 0]
            kt, vt = (k[b, hk], v[b, hk]) if split else (k[b, hk].float(), v[b, hk].float())
            if fill:
                kbar, vbar = kbar_all[b, hk], vbar_all[b, hk]  # (NK, D) each
            for h in range(hk * group, (hk + 1) * group):
                for c0 in range(0, Sq, chunk):
                    c1 = min(Sq, c0 + chunk)
                    nb = c1 - c0
                    r0, r1 = c0 * BQ, c1 * BQ
                    R = r1 - r0
                    rv = row_valid[r0:r1]
                    # quantized scores (log2 units) against every key, reduced per key block
                    if int_mm:
                        s = _int_scores(q_i8[b, h, r0:r1], kq, qs_rows[b, h, r0:r1], ksc)
                    else:
                        s = (q_i8[b, h, r0:r1].float() * qs_rows[b, h, r0:r1, None]) @ kd.T
                    if NKp > N:
                        s[:, N:] = -math.inf
                    s = s.view(R, NK, BK)
                    m = s.amax(-1)  # (R, NK)
                    p = torch.exp2(s.sub_(m[..., None]), out=s)
                    lsum = p.sum(-1)  # (R, NK)
                    o = _block_pv(p, vq, pvd, half_pv)  # (R, NK, D) fp32
                    del s, p
                    # the truth for the same rows: fp32-accurate dense attention
                    ref = _truth_rows(q_rows[b, h, r0:r1], kt, vt, scale, split)
                    rvf = rv.to(ref.dtype)
                    den_blk[h, c0:c1] += (ref.abs().sum(-1) * rvf).view(nb, BQ).sum(-1)
                    # every candidate mask at once: O = sum_j w_j o_j / sum_j w_j l_j
                    km = masks[:, b, h, c0:c1].permute(1, 0, 2)[:, None]  # (nb, 1, X, NK)
                    km = km.expand(nb, BQ, X, NK).reshape(R, X, NK)
                    w = torch.where(km, m[:, None, :], torch.full((), -math.inf, device=dev))
                    if fill:  # skipped blocks: one estimated key each (score t, exp-sum 1, value vbar)
                        t = (q_i8[b, h, r0:r1].float() * qs_rows[b, h, r0:r1, None]) @ kbar.T
                        t = t + fill_bias[b, h, c0:c1].repeat_interleave(BQ, dim=0)  # (R, NK)
                        wf = torch.where(km, torch.full((), -math.inf, device=dev), t[:, None, :])
                        top = torch.maximum(w.amax(-1, keepdim=True), wf.amax(-1, keepdim=True))
                        wf = torch.exp2(wf.sub_(top), out=wf)
                        w = torch.exp2(w.sub_(top), out=w)
                        lt = torch.bmm(w, lsum[:, :, None]) + wf.sum(-1, keepdim=True)
                        out = (torch.bmm(w, o) + wf @ vbar).div_(lt.clamp_min_(TINY)).mul_(vscale)
                        del wf, t
                    else:
                        w = torch.exp2(w.sub_(w.amax(-1, keepdim=True)), out=w)  # 0 where not kept
                        lt = torch.bmm(w, lsum[:, :, None])  # (R, X, 1)
                        out = torch.bmm(w, o).div_(lt.clamp_min_(TINY)).mul_(vscale)  # (R, X, D)
                    out = out.to(out_dtype).float()  # the kernel stores the output in q's dtype
                    e = (out.sub_(ref[:, None, :])).abs_().sum(-1) * rvf[:, None]  # (R, X)
                    num_blk[:, h, c0:c1] += e.view(nb, BQ, X).sum(1).T
    del masks
    num_blk, den_blk, density = num_blk.cpu(), den_blk.cpu(), density.cpu()

    num_d, den_d = num_blk.sum(-1), den_blk.sum(-1)  # (X, H), (H,)
    r = num_d / den_d.clamp_min(1e-300)
    # standard error of the ratio estimate sum(num)/sum(den) from Sq of NQ blocks (simple random
    # sampling formula with finite-population correction; conservative for the stratified draw)
    resid2 = ((num_blk - r[..., None] * den_blk[None]) ** 2).sum(-1)
    var = resid2 * ((1.0 - Sq / NQ) * Sq / max(Sq - 1, 1))  # variance of the numerator sum
    num = num_d.float()
    den_f = den_d.float()
    safe_den = den_f.clamp_min(TINY)
    err_all = torch.where(den_f > 0, num / safe_den, torch.zeros_like(num))  # (X, H)
    err_var = var[:-1].float().reshape(sims.numel(), cands.numel(), H)
    err = err_all[:-1].reshape(Sn, C, H)
    err_num = num[:-1].reshape(Sn, C, H)
    dens = density[:-1].reshape(Sn, C, H)
    floor_l1, floor_num = err_all[-1], num[-1]
    err_se = err_var.sqrt() / safe_den
    si, ci, dense, sparsity, chosen = _choose(budget, err + z * err_se, dens, den_f, target_l1, dense_below)
    chosen = torch.where(dense, chosen, err[si, ci, torch.arange(H)])  # report the estimate, not the bound
    chosen = torch.where(dense, floor_l1, chosen)
    return CallCalibration(
        mode=mode, scoring=scoring, target_l1=target_l1, candidates=cands, sim_candidates=sims,
        err=err, err_num=err_num, err_den=den_f, err_var=err_var, err_se=err_se, z=float(z), density=dens,
        floor_l1=floor_l1, floor_num=floor_num,
        threshold=torch.where(dense, torch.full((H,), DENSE_THRESHOLD), cands[ci]),
        simthreshd1=torch.where(dense, torch.full((H,), DENSE_SIMTHRESHD1), sims[si]),
        pvthreshd=torch.full((H,), math.inf), dense=dense, sparsity=sparsity, rel_l1=chosen,
        n_tokens=N, grid=grid, block_q=BQ, block_k=BK, pv_dtype=pvd, sampled_blocks=sel.tolist(),
        seconds=time.perf_counter() - t0, fill_skipped=bool(fill),
    )


class Calibrator:
    """Accumulates calibrate_call results per (layer, head) over many calls (steps, cond/uncond)
    and combines them into one SpargeProfile.

    combine: how the per-call error curves of a (layer, head) are merged before choosing:
      "max"      the worst call's error per candidate (= the tightest per-call choice): the
                 profile meets the target on every calibration call (sampled). Default.
      "quantile" the `quantile` of the per-call errors (e.g. 0.9: 10% of calls may exceed).
      "mean"     the error summed over calls (sum |o - o_ref| / sum |o_ref|): the target holds
                 on average over the run, individual steps may exceed it.
    Each call draws its own sample, so many calls see many blocks: 16 sampled blocks per call
    (the default here; 3.1x one dense call at Wan 480p on an H100) are plenty across a run.
    """

    def __init__(self, target_l1: float, *, mode: str = "cdf", scoring: str = "lse",
                 candidates: Optional[Sequence[float]] = None, sim_candidates: Optional[Sequence[float]] = None,
                 sample_query_blocks: int = 16, backend: str = "auto", pv_dtype: str = "auto",
                 combine: str = "max", quantile: float = 0.9, z: float = 1.0, budget: str = "head",
                 seed: int = 0, dense_below: float = DENSE_BELOW, fill: bool = False):
        if combine not in COMBINE_POLICIES:
            raise ValueError(f"combine must be one of {COMBINE_POLICIES}, got {combine!r}")
        if not (0.0 <= float(quantile) <= 1.0):
            raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
        if not (0.0 < float(target_l1) <= 1.0):
            raise ValueError(f"target_l1 must lie in (0, 1], got {target_l1}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if int(sample_query_blocks) < 2:
            raise ValueError(f"sample_query_blocks must be >= 2, got {sample_query_blocks}")
        if fill and scoring != "lse":
            raise ValueError("fill needs 'lse' scoring")
        self.target_l1 = float(target_l1)
        self.mode, self.scoring = mode, scoring
        self.fill = bool(fill)
        self.candidates = candidates if candidates is not None else default_candidates(mode)
        self.sim_candidates = sim_candidates
        self.sample_query_blocks = int(sample_query_blocks)
        self.backend, self.pv_dtype = backend, pv_dtype
        self.combine, self.quantile = combine, float(quantile)
        self.dense_below = float(dense_below)
        self.z = float(z)
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        self.budget = budget
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self.calls: Dict[int, List[CallCalibration]] = {}
        self.steps = 0

    def observe(self, layer: int, q, k, v, *, grid=None, scale=None) -> CallCalibration:
        """Calibrate one call of `layer` and record it. Each call draws a fresh sample."""
        cal = calibrate_call(q, k, v, self.target_l1, grid=grid, scale=scale, mode=self.mode, scoring=self.scoring,
                             candidates=self.candidates, sim_candidates=self.sim_candidates,
                             sample_query_blocks=self.sample_query_blocks, backend=self.backend,
                             pv_dtype=self.pv_dtype, generator=self.generator, z=self.z, budget=self.budget,
                             dense_below=self.dense_below, fill=self.fill)
        self.add(layer, cal)
        return cal

    def add(self, layer: int, cal: CallCalibration) -> None:
        layer = int(layer)
        if layer < 0:
            raise ValueError(f"layer ids must be >= 0, got {layer}")
        if (cal.mode != self.mode or cal.scoring != self.scoring or abs(cal.target_l1 - self.target_l1) > 1e-12
                or cal.fill_skipped != self.fill):
            raise ValueError("this call was calibrated with another mode, scoring, target or fill setting than the "
                             "Calibrator")
        ref = next((c for cs in self.calls.values() for c in cs), None)
        if ref is not None:
            if cal.n_tokens != ref.n_tokens or cal.grid != ref.grid:
                raise ValueError(f"calls differ in token count or grid ({cal.n_tokens}, {cal.grid} vs "
                                 f"{ref.n_tokens}, {ref.grid}): calibrate one resolution per profile")
            if (cal.block_q, cal.block_k, cal.pv_dtype) != (ref.block_q, ref.block_k, ref.pv_dtype):
                raise ValueError("calls differ in block sizes or P.V dtype (backend)")
            same = torch.equal(cal.candidates, ref.candidates) and torch.equal(cal.sim_candidates, ref.sim_candidates)
            if not same:
                raise ValueError("calls were calibrated with different candidate lists")
        same = self.calls.get(layer)
        if same and same[0].heads != cal.heads:
            raise ValueError(f"layer {layer} had {same[0].heads} heads, this call has {cal.heads}")
        self.calls.setdefault(layer, []).append(cal)

    def mark_step(self) -> None:
        """Count one sampling step (stored in the profile's metadata)."""
        self.steps += 1

    @property
    def n_calls(self) -> int:
        return sum(len(c) for c in self.calls.values())

    def layer_choice(self, layer: int) -> dict:
        """The combined choice for one layer: per-head tensors plus the measured figures."""
        cs = self.calls.get(int(layer))
        if not cs:
            raise ValueError(f"no calls recorded for layer {layer}")
        bound = torch.stack([c.err + self.z * c.err_se for c in cs])  # (calls, S, C, H)
        num = torch.stack([c.err_num for c in cs])
        den = torch.stack([c.err_den for c in cs])  # (calls, H)
        dens = torch.stack([c.density for c in cs]).mean(0)
        if self.combine == "max":
            E = bound.amax(0)
        elif self.combine == "quantile":
            E = torch.quantile(bound, self.quantile, dim=0)
        else:  # the pooled estimate over all calls, plus z of its (smaller) standard error
            var = torch.stack([c.err_var for c in cs]).sum(0)
            E = (num.sum(0) + self.z * var.sqrt()) / den.sum(0).clamp_min(TINY)
        si, ci, dense, sparsity, _ = _choose(self.budget, E, dens, den.mean(0), self.target_l1, self.dense_below)
        c0 = cs[0]
        H = c0.heads
        h = torch.arange(H)
        floor_num = torch.stack([c.floor_num for c in cs])  # (calls, H)
        chosen_num = torch.where(dense[None], floor_num, num[:, si, ci, h])  # (calls, H)
        head_l1 = chosen_num.sum(0) / den.sum(0).clamp_min(TINY)
        per_call = chosen_num.sum(1) / den.sum(1).clamp_min(TINY)
        return dict(
            threshold=torch.where(dense, torch.full((H,), DENSE_THRESHOLD), c0.candidates[ci]),
            simthreshd1=torch.where(dense, torch.full((H,), DENSE_SIMTHRESHD1), c0.sim_candidates[si]),
            pvthreshd=torch.full((H,), math.inf), dense=dense, head_sparsity=sparsity, head_rel_l1=head_l1,
            sparsity=float(sparsity.mean()), rel_l1=float(chosen_num.sum() / den.sum().clamp_min(TINY)),
            rel_l1_worst=float(per_call.max()), calls=len(cs),
        )

    def result(self, *, model_family: str = "unknown", n_layers: Optional[int] = None, steps: Optional[int] = None):
        """A SpargeProfile with one row per layer 0 .. n_layers-1 (default: the highest layer seen
        + 1). Layers never observed are stored as not calibrated (they run dense)."""
        from .profiles import PACK_VERSION, SpargeProfile

        if not self.calls:
            raise ValueError("no calls recorded: run observe() during sampling first")
        L = max(self.calls) + 1 if n_layers is None else int(n_layers)
        if L <= max(self.calls):
            raise ValueError(f"n_layers={L} but layer {max(self.calls)} was observed")
        c0 = next(iter(self.calls.values()))[0]
        H = c0.heads
        if any(c[0].heads != H for c in self.calls.values()):
            raise ValueError("layers have different head counts; one profile holds one head count")
        thr = torch.full((L, H), DENSE_THRESHOLD)
        sim = torch.full((L, H), DENSE_SIMTHRESHD1)
        pv = torch.full((L, H), math.inf)
        dense = torch.ones(L, H, dtype=torch.bool)
        calibrated = torch.zeros(L, dtype=torch.bool)
        hs, hl = torch.zeros(L, H), torch.zeros(L, H)
        sp, l1, l1w = torch.zeros(L), torch.zeros(L), torch.zeros(L)
        for layer in sorted(self.calls):
            ch = self.layer_choice(layer)
            thr[layer], sim[layer] = ch["threshold"], ch["simthreshd1"]
            pv[layer], dense[layer] = ch["pvthreshd"], ch["dense"]
            hs[layer], hl[layer] = ch["head_sparsity"], ch["head_rel_l1"]
            sp[layer], l1[layer], l1w[layer] = ch["sparsity"], ch["rel_l1"], ch["rel_l1_worst"]
            calibrated[layer] = True
        return SpargeProfile(
            mode=self.mode, scoring=self.scoring, threshold=thr, simthreshd1=sim, pvthreshd=pv, dense=dense,
            calibrated=calibrated, head_sparsity=hs, head_rel_l1=hl, sparsity=sp, rel_l1=l1, rel_l1_worst=l1w,
            model_family=str(model_family), n_tokens=c0.n_tokens, grid=c0.grid, target_l1=self.target_l1,
            steps=self.steps if steps is None else int(steps), calls=self.n_calls, block_q=c0.block_q,
            block_k=c0.block_k, pv_dtype=c0.pv_dtype, sample_query_blocks=self.sample_query_blocks,
            combine=self.combine if self.combine != "quantile" else f"quantile:{self.quantile:g}",
            pack_version=PACK_VERSION, fill_skipped=self.fill,
        )
