"""Calibration step 3: error statistics from the sampled blocks, and the per-head choice.

The error of a candidate is a ratio estimate, sum over sampled blocks of |O - O_ref| over the
sum of |O_ref|, with a standard error from the spread of the blocks (simple random sampling
with finite-population correction). Per head, the loosest candidate whose estimate plus z
standard errors is <= target, and stays so for every tighter candidate (robust to a
non-monotone error curve), wins; among similarity thresholds the sparsest wins. Heads whose
best sparsity is below DENSE_BELOW, or that cannot reach the target at all (e.g. quantization
alone is above it), are marked dense: threshold 1.0 and simthreshd1 1.0, which keep every block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence

import torch

from .params import SpargeParams
from .profiles import DENSE_SIMTHRESHD1, DENSE_THRESHOLD
from .reference_quant import TINY

DENSE_BELOW = 0.10  # a head whose best sparsity at the target is below this runs dense


class ErrorStats(NamedTuple):
    """Sampled error curves of one call over (similarity candidate S, threshold candidate C, head H)."""

    err: torch.Tensor  # (S, C, H) sampled rel-L1 vs fp32 dense
    err_num: torch.Tensor  # (S, C, H) sum |o - o_ref| over the sampled rows
    err_den: torch.Tensor  # (H,) sum |o_ref| over the sampled rows
    err_var: torch.Tensor  # (S, C, H) sampling variance of err_num (0 when every block was sampled)
    err_se: torch.Tensor  # (S, C, H) standard error of err: sqrt(err_var) / err_den
    density: torch.Tensor  # (S, C, H) kept fraction of the sampled query blocks' key blocks
    floor_l1: torch.Tensor  # (H,) every block kept: quantization error alone
    floor_num: torch.Tensor  # (H,)


def error_statistics(num_blk, den_blk, density, n_blocks: int, n_sims: int, n_cands: int) -> ErrorStats:
    """From per-block sums (num_blk (X, H, Sq), den_blk (H, Sq), X = S*C + 1 with the
    keep-everything mask last) and the masks' density (X, H) to the curves.

    err = sum num / sum den (0 for a head whose truth is all zero). Its numerator's variance,
    from Sq of the call's n_blocks query blocks: sum_i (num_i - err den_i)^2 * (1 - Sq/NQ) *
    Sq/(Sq - 1) (conservative for the stratified draw)."""
    num_blk, den_blk, density = num_blk.cpu(), den_blk.cpu(), density.cpu()
    Sq, H = den_blk.shape[1], den_blk.shape[0]
    num_d, den_d = num_blk.sum(-1), den_blk.sum(-1)  # (X, H), (H,)
    r = num_d / den_d.clamp_min(1e-300)
    resid2 = ((num_blk - r[..., None] * den_blk[None]) ** 2).sum(-1)
    var = resid2 * ((1.0 - Sq / n_blocks) * Sq / max(Sq - 1, 1))  # variance of the numerator sum
    num, den = num_d.float(), den_d.float()
    safe_den = den.clamp_min(TINY)
    err_all = torch.where(den > 0, num / safe_den, torch.zeros_like(num))  # (X, H)
    err_var = var[:-1].float().reshape(n_sims, n_cands, H)
    return ErrorStats(err=err_all[:-1].reshape(n_sims, n_cands, H), err_num=num[:-1].reshape(n_sims, n_cands, H),
                      err_den=den, err_var=err_var, err_se=err_var.sqrt() / safe_den,
                      density=density[:-1].reshape(n_sims, n_cands, H), floor_l1=err_all[-1], floor_num=num[-1])


def pick_configs(err: torch.Tensor, density: torch.Tensor, target_l1: float):
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
    dense = ~torch.isfinite(best_sp) | (best_sp < DENSE_BELOW)
    chosen_err = err[best, cand, h]
    sparsity = torch.where(dense, torch.zeros_like(best_sp), best_sp)
    chosen_err = torch.where(dense, torch.full_like(chosen_err, math.nan), chosen_err)
    return best, cand, dense, sparsity, chosen_err


def with_dense(dense, threshold, simthreshd1):
    """Per-head (threshold, simthreshd1) with the dense heads' 1.0 and 1.0: no block has a
    mean cosine above 1, so every query block of a dense head keeps every key block."""
    return (torch.where(dense, torch.full_like(threshold, DENSE_THRESHOLD), threshold),
            torch.where(dense, torch.full_like(simthreshd1, DENSE_SIMTHRESHD1), simthreshd1))


def choose_heads(stats: ErrorStats, z: float, target_l1: float, cands, sims) -> dict:
    """One call's per-head choice: pick_configs on err + z * err_se (the bound); the reported
    rel_l1 is the estimate at the choice (dense heads: the quantization floor)."""
    si, ci, dense, sparsity, _ = pick_configs(stats.err + z * stats.err_se, stats.density, target_l1)
    H = dense.numel()
    threshold, simthreshd1 = with_dense(dense, cands[ci], sims[si])
    return dict(threshold=threshold, simthreshd1=simthreshd1, pvthreshd=torch.full((H,), math.inf), dense=dense,
                sparsity=sparsity, rel_l1=torch.where(dense, stats.floor_l1, stats.err[si, ci, torch.arange(H)]))


@dataclass
class CallCalibration:
    """What calibrate_call measured and chose for one attention call (all tensors on the CPU).

    Curves over (similarity candidate S, threshold candidate C, head H) are kept so that a
    Calibrator can combine calls (field meanings as in ErrorStats); the per-head choice is in
    threshold/simthreshd1/dense."""

    mode: str
    scoring: str
    target_l1: float
    candidates: torch.Tensor  # (C,) thresholds, loosest first
    sim_candidates: torch.Tensor  # (S,)
    err: torch.Tensor
    err_num: torch.Tensor
    err_den: torch.Tensor
    err_var: torch.Tensor
    err_se: torch.Tensor
    z: float  # the choice required err + z * err_se <= target
    density: torch.Tensor
    floor_l1: torch.Tensor
    floor_num: torch.Tensor
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
        thr, sim = with_dense(self.dense, self.threshold, self.simthreshd1)
        kw = {"cdfthreshd" if self.mode == "cdf" else "topk": thr.float()}
        return SpargeParams(simthreshd1=sim.float(), pvthreshd=self.pvthreshd.float(), scoring=self.scoring,
                            attention_sink=attention_sink, is_causal=is_causal, fill_skipped=self.fill_skipped, **kw)


def combine_calls(calls: Sequence[CallCalibration], z: float, target_l1: float) -> dict:
    """The choice for one layer from all its calls: per candidate the WORST call's bound
    (err + z * err_se), i.e. the tightest per-call choice, so the profile meets the target on
    every calibration call (sampled); density is the calls' mean. Reports per head the pooled
    rel-L1 over the calls at the choice, per layer the pooled and the worst call's."""
    bound = torch.stack([c.err + z * c.err_se for c in calls]).amax(0)  # (S, C, H)
    num = torch.stack([c.err_num for c in calls])  # (calls, S, C, H)
    den = torch.stack([c.err_den for c in calls])  # (calls, H)
    dens = torch.stack([c.density for c in calls]).mean(0)
    si, ci, dense, sparsity, _ = pick_configs(bound, dens, target_l1)
    c0 = calls[0]
    H = c0.heads
    floor_num = torch.stack([c.floor_num for c in calls])  # (calls, H)
    chosen_num = torch.where(dense[None], floor_num, num[:, si, ci, torch.arange(H)])  # (calls, H)
    per_call = chosen_num.sum(1) / den.sum(1).clamp_min(TINY)
    threshold, simthreshd1 = with_dense(dense, c0.candidates[ci], c0.sim_candidates[si])
    return dict(
        threshold=threshold, simthreshd1=simthreshd1, pvthreshd=torch.full((H,), math.inf), dense=dense,
        head_sparsity=sparsity, head_rel_l1=chosen_num.sum(0) / den.sum(0).clamp_min(TINY),
        sparsity=float(sparsity.mean()), rel_l1=float(chosen_num.sum() / den.sum().clamp_min(TINY)),
        rel_l1_worst=float(per_call.max()), calls=len(calls),
    )
