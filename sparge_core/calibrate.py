"""Per-head threshold calibration against a measured error, in about the time of a sampling run.

The reference's "tune mode" bisects thresholds per layer and head by running the whole sparse
kernel again and again. Here one attention call is calibrated in ONE pass over a sample of
query blocks, in three steps:

1. calibrate_masks: stage 1 (block scores, for every head at once) for the sampled query
   blocks only, and the block mask of every candidate threshold (and similarity threshold)
   from the same scores with the reference's own selection code.
2. calibrate_partials: for the sampled rows, the quantized scores against every key reduced
   per key block to (max, exp-sum, P.V partial), as the kernel rounds them; any mask's output
   is an exact log-sum-exp combination of its kept blocks' partials, so every candidate costs
   one combination. Each is compared with dense attention of the same rows to fp32 accuracy.
3. calibrate_stats: per candidate the sampled rel-L1 (sum|o - o_ref| / sum|o_ref|) and its
   standard error; per head the loosest candidate that meets the target (see there).

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
from typing import Dict, List, Optional, Sequence

import torch

from .api import block_sizes, validate_qkv
from .calibrate_masks import (
    DEFAULT_CANDIDATES,
    DEFAULT_CDF_CANDIDATES,
    DEFAULT_SIM_CANDIDATES,
    DEFAULT_TOPK_CANDIDATES,
    CallBlocks,
    candidate_masks,
    check_candidates,
    sample_blocks,
    sampled_rows,
)
from .calibrate_partials import pv_dtype_for, sampled_block_errors
from .calibrate_stats import DENSE_BELOW, CallCalibration, choose_heads, combine_calls, error_statistics, pick_configs
from .hilbert import TokenPermutation
from .params import SCORINGS
from .profiles import DENSE_SIMTHRESHD1, DENSE_THRESHOLD, PACK_VERSION, SpargeProfile
from .reference_predict import key_variances, mean_keys_i8
from .reference_quant import quantize_int8_per_block, smooth_k

__all__ = ["Calibrator", "CallCalibration", "calibrate_call", "pick_configs", "DEFAULT_CDF_CANDIDATES",
           "DEFAULT_TOPK_CANDIDATES", "DEFAULT_SIM_CANDIDATES", "DENSE_BELOW"]


def _check_settings(target_l1, mode: str, scoring: str, sample_query_blocks, z, fill: bool) -> float:
    """The checks shared by calibrate_call and Calibrator; returns target_l1 as a float."""
    if mode not in DEFAULT_CANDIDATES:
        raise ValueError(f"mode must be 'cdf' or 'topk', got {mode!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if fill and scoring != "lse":
        raise ValueError("fill needs 'lse' scoring (the estimate is calibrated by the lse scores)")
    if not (0.0 < float(target_l1) <= 1.0):
        raise ValueError(f"target_l1 must lie in (0, 1], got {target_l1}")
    if int(sample_query_blocks) < 2:
        raise ValueError(f"sample_query_blocks must be >= 2 (a standard error needs two), got {sample_query_blocks}")
    if not (math.isfinite(float(z)) and float(z) >= 0):
        raise ValueError(f"z must be a finite number >= 0, got {z}")
    return float(target_l1)


def _call_blocks(q, k, scale, backend: str) -> CallBlocks:
    """The call's blocks (from the backend) and softmax scale, checked: self-attention, a
    positive scale, at least one whole query block."""
    N, D = q.shape[2], q.shape[3]
    if k.shape[2] != N:
        raise ValueError(f"calibrate_call is for self-attention: q has {N} tokens, k has {k.shape[2]}")
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    BQ, BK = block_sizes(q.device, backend)
    if N < BQ:
        raise ValueError(f"{N} tokens are fewer than one {BQ}-token query block: such calls always run dense")
    return CallBlocks(n=N, heads=q.shape[1], block_q=BQ, block_k=BK, scale=scale)


def _to_hilbert(q, k, v, grid):
    """q, k, v in the kernel's token order: 3D Hilbert order of the grid's t*h*w tokens."""
    N = q.shape[2]
    if math.prod(grid) > N:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but q has {N}")
    perm = TokenPermutation.for_grid(grid, N, device=q.device)
    return perm.apply(q, 2), perm.apply(k, 2), perm.apply(v, 2)


@torch.no_grad()
def calibrate_call(q, k, v, target_l1: float, *, grid: Optional[Sequence[int]] = None,
                   scale: Optional[float] = None, mode: str = "cdf", scoring: str = "lse",
                   candidates: Optional[Sequence[float]] = None,
                   sim_candidates: Optional[Sequence[float]] = None,
                   sample_query_blocks: int = 32, backend: str = "auto", pv_dtype: str = "auto",
                   generator: Optional[torch.Generator] = None, z: float = 1.0, fill: bool = False) -> CallCalibration:
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
    fill: measure with the skipped blocks estimated (SpargeParams.fill_skipped; "lse" scoring):
        a skipped block j of a sampled row r then contributes the partial (score t_rj = q_r .
        kbar_j + bias_ij, sum 1, value vbar_j) instead of nothing, the kernel's fill pass.
    """
    t0 = time.perf_counter()
    validate_qkv(q, k, v)
    target_l1 = _check_settings(target_l1, mode, scoring, sample_query_blocks, z, fill)
    cands = check_candidates("candidates", DEFAULT_CANDIDATES[mode] if candidates is None else candidates,
                             0.0, lo_open=True)
    sims = check_candidates("sim_candidates", DEFAULT_SIM_CANDIDATES[scoring] if sim_candidates is None
                            else sim_candidates, -1.0, lo_open=False)
    blocks = _call_blocks(q, k, scale, backend)
    pvd = pv_dtype_for(q.device, backend, pv_dtype)
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        q, k, v = _to_hilbert(q, k, v, grid)
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0)
    # step 1: the sample and every candidate's block mask (calibrate_masks)
    sel = sample_blocks(blocks.nq, int(sample_query_blocks), generator)
    q_rows, row_valid = sampled_rows(q, sel, blocks.block_q)
    ksm = smooth_k(k.float())
    k_i8, k_scale = quantize_int8_per_block(ksm, blocks.block_k)
    kbar = mean_keys_i8(ksm, blocks.block_k) if fill else None  # the estimate's mean keys, for both steps
    kvar = key_variances(k, blocks.block_k, k_smooth=ksm) if fill else None  # and its keys' variances
    masks, fill_bias = candidate_masks(q_rows, row_valid, ksm, k_i8, k_scale, cands, sims, mode, scoring, blocks,
                                       kbar)
    del ksm
    density = masks.float().mean(dim=(1, 3, 4))  # (X, H)
    # step 2: per-block errors of every candidate from the rows' block partials (calibrate_partials)
    num_blk, den_blk = sampled_block_errors(q_rows, row_valid, k, v, k_i8, k_scale, masks, fill_bias, blocks,
                                            pvd, kbar, kvar)
    del masks
    # step 3: error curves with standard errors, and the per-head choice (calibrate_stats)
    stats = error_statistics(num_blk, den_blk, density, blocks.nq, sims.numel(), cands.numel())
    return CallCalibration(
        mode=mode, scoring=scoring, target_l1=target_l1, candidates=cands, sim_candidates=sims, z=float(z),
        **stats._asdict(), **choose_heads(stats, float(z), target_l1, cands, sims),
        n_tokens=blocks.n, grid=grid, block_q=blocks.block_q, block_k=blocks.block_k, pv_dtype=pvd,
        sampled_blocks=sel.tolist(), seconds=time.perf_counter() - t0, fill_skipped=bool(fill),
    )


class Calibrator:
    """Accumulates calibrate_call results per (layer, head) over many calls (steps, cond/uncond)
    and combines them into one SpargeProfile.

    The per-call error curves of a (layer, head) are merged by taking the worst call's error
    per candidate (= the tightest per-call choice): the profile meets the target on every
    calibration call (sampled); the profile records this as combine "max". Each call draws its
    own sample, so many calls see many blocks: 16 sampled blocks per call (the default here;
    3.1x one dense call at Wan 480p on an H100) are plenty across a run.
    """

    def __init__(self, target_l1: float, *, mode: str = "cdf", scoring: str = "lse",
                 candidates: Optional[Sequence[float]] = None, sim_candidates: Optional[Sequence[float]] = None,
                 sample_query_blocks: int = 16, backend: str = "auto", pv_dtype: str = "auto",
                 z: float = 1.0, seed: int = 0, fill: bool = False):
        self.target_l1 = _check_settings(target_l1, mode, scoring, sample_query_blocks, z, fill)
        self.mode, self.scoring = mode, scoring
        self.fill = bool(fill)
        self.candidates, self.sim_candidates = candidates, sim_candidates
        self.sample_query_blocks = int(sample_query_blocks)
        self.backend, self.pv_dtype = backend, pv_dtype
        self.z = float(z)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self.calls: Dict[int, List[CallCalibration]] = {}
        self.steps = 0

    def observe(self, layer: int, q, k, v, *, grid=None, scale=None) -> CallCalibration:
        """Calibrate one call of `layer` and record it. Each call draws a fresh sample."""
        cal = calibrate_call(q, k, v, self.target_l1, grid=grid, scale=scale, mode=self.mode, scoring=self.scoring,
                             candidates=self.candidates, sim_candidates=self.sim_candidates,
                             sample_query_blocks=self.sample_query_blocks, backend=self.backend,
                             pv_dtype=self.pv_dtype, generator=self.generator, z=self.z, fill=self.fill)
        self.add(layer, cal)
        return cal

    def add(self, layer: int, cal: CallCalibration) -> None:
        """Record a call of `layer`; it must match the Calibrator's settings and the calls so far
        (one resolution, block sizes, P.V dtype, candidate lists; one head count per layer)."""
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
        return combine_calls(cs, self.z, self.target_l1)

    def result(self, *, model_family: str = "unknown", n_layers: Optional[int] = None,
               steps: Optional[int] = None) -> SpargeProfile:
        """A SpargeProfile with one row per layer 0 .. n_layers-1 (default: the highest layer seen
        + 1). Layers never observed are stored as not calibrated (they run dense)."""
        if not self.calls:
            raise ValueError("no calls recorded: run observe() during sampling first")
        L = max(self.calls) + 1 if n_layers is None else int(n_layers)
        if L <= max(self.calls):
            raise ValueError(f"n_layers={L} but layer {max(self.calls)} was observed")
        c0 = next(iter(self.calls.values()))[0]
        H = c0.heads
        if any(c[0].heads != H for c in self.calls.values()):
            raise ValueError("layers have different head counts; one profile holds one head count")
        rows = dict(threshold=torch.full((L, H), DENSE_THRESHOLD), simthreshd1=torch.full((L, H), DENSE_SIMTHRESHD1),
                    pvthreshd=torch.full((L, H), math.inf), dense=torch.ones(L, H, dtype=torch.bool),
                    head_sparsity=torch.zeros(L, H), head_rel_l1=torch.zeros(L, H), sparsity=torch.zeros(L),
                    rel_l1=torch.zeros(L), rel_l1_worst=torch.zeros(L))
        calibrated = torch.zeros(L, dtype=torch.bool)
        for layer in sorted(self.calls):
            choice = self.layer_choice(layer)
            for name, table in rows.items():
                table[layer] = choice[name]
            calibrated[layer] = True
        return SpargeProfile(
            mode=self.mode, scoring=self.scoring, calibrated=calibrated, **rows,
            model_family=str(model_family), n_tokens=c0.n_tokens, grid=c0.grid, target_l1=self.target_l1,
            steps=self.steps if steps is None else int(steps), calls=self.n_calls, block_q=c0.block_q,
            block_k=c0.block_k, pv_dtype=c0.pv_dtype, sample_query_blocks=self.sample_query_blocks,
            combine="max", pack_version=PACK_VERSION, fill_skipped=self.fill,
        )
