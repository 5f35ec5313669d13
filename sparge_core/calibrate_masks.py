"""Calibration step 1: the sample of query blocks and the block mask of every candidate.

The masks come from the reference's own stage-1 code (`select_blocks`), run once for all
candidates: each (similarity candidate, threshold candidate) pair is stacked along the head
axis as if it were another head, so one selection call yields every candidate's mask and a
candidate means exactly what the kernel will do with it. Only the sampled query blocks are
scored; every stage-1 quantity of a query block depends on that block's tokens alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockmask import num_blocks
from .params import SpargeParams
from .reference_predict import block_lse_scores, lse_sampling, pool_and_similarity, select_blocks
from .reference_quant import expand_kv

# Candidates cost little (one mask + one combination each); a fine grid lands close to the target.
DEFAULT_CDF_CANDIDATES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95,
                          0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995, 1.0)
DEFAULT_TOPK_CANDIDATES = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.25, 0.28, 0.3, 0.33,
                           0.36, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_CANDIDATES = {"cdf": DEFAULT_CDF_CANDIDATES, "topk": DEFAULT_TOPK_CANDIDATES}
# the query-side similarity rule: -1 = off. With "lse" scoring the key side is exact, so the
# rule only forces poorly summarised query blocks dense; trying 0.3 as well costs almost nothing.
DEFAULT_SIM_CANDIDATES = {"lse": (-1.0, 0.3), "pooled": (-1.0, 0.3, 0.6)}


@dataclass(frozen=True)
class CallBlocks:
    """One call's shape as the kernel blocks it: N tokens, H query heads, blocks of BQ / BK."""

    n: int
    heads: int
    block_q: int
    block_k: int
    scale: float

    @property
    def nq(self) -> int:
        return num_blocks(self.n, self.block_q)

    @property
    def nk(self) -> int:
        return num_blocks(self.n, self.block_k)


def check_candidates(name: str, values, lo: float, lo_open: bool) -> torch.Tensor:
    """Candidate values as a float32 tensor: non-empty, in (lo, 1] or [lo, 1], strictly increasing."""
    t = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if torch.isnan(t).any() or (t > 1).any() or ((t <= lo) if lo_open else (t < lo)).any():
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, 1], got {t.tolist()}")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing (loosest first), got {t.tolist()}")
    return t.float()


def sample_blocks(nq: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n query blocks, one drawn uniformly from each of n equal strata (stratified: in Hilbert
    order consecutive blocks are neighbours in the video, so the sample covers it evenly)."""
    if n >= nq:
        return torch.arange(nq)
    edges = torch.linspace(0, nq, n + 1, dtype=torch.float64).floor().long()
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (lo + (u * (hi - lo).double()).floor().long()).clamp(max=nq - 1)


def sampled_rows(q, sel: torch.Tensor, block_q: int):
    """The sampled query blocks' tokens, zero padded past the end: q_rows (B, H, Sq*BQ, D) and
    row_valid (Sq*BQ,) bool, False on the padding of a partial last block."""
    n = q.shape[2]
    sel_d = sel.to(q.device)
    tok = (sel_d[:, None] * block_q + torch.arange(block_q, device=q.device)[None, :]).reshape(-1)  # (Sq*BQ,)
    row_valid = tok < n
    q_rows = q.index_select(2, tok.clamp(max=n - 1)) * row_valid[:, None].to(q.dtype)
    return q_rows, row_valid


def _pooled_queries(q_rows, row_valid, block_q: int):
    """Mean token and mean pairwise cosine of each sampled block. pool_and_similarity counts
    every block as full; a partial block's sums are rescaled by BQ/count (mean) and its square
    (cosine over count^2 pairs)."""
    cnt = row_valid.view(-1, block_q).sum(-1).to(torch.float32)  # real tokens per sampled block
    q_pool, q_sim = pool_and_similarity(q_rows, block_q)
    fix = block_q / cnt
    return q_pool * fix[:, None], q_sim * (fix * fix)


def _key_side(q_pool, ksm, k_i8, k_scale, scoring: str, blocks: CallBlocks, kbar):
    """What select_blocks needs besides the pooled queries: the exact lse block scores
    ("lse") or the pooled keys and their self-similarity ("pooled"). With the fill estimate's
    mean keys (kbar, mean_keys_i8's answer), also its bias per (sampled query block, key block):
    lse score - mean score, i.e. log2 of the block's exp-sum over its mean key's exp (B, H, Sq, NK)."""
    fill = kbar is not None
    if scoring != "lse":
        k_pool, k_sim = pool_and_similarity(ksm, blocks.block_k)
        return None, expand_kv(k_pool, blocks.heads), expand_kv(k_sim[..., None], blocks.heads)[..., 0], None
    scores = block_lse_scores(q_pool, k_i8, k_scale, blocks.scale, blocks.n, blocks.block_k, want_mean=fill,
                              kbar=kbar, **lse_sampling(ksm, blocks.block_k))
    if not fill:
        return scores, None, None, None
    scores, mean_scores = scores
    return scores, None, None, scores - mean_scores


def candidate_masks(q_rows, row_valid, ksm, k_i8, k_scale, cands, sims, mode: str, scoring: str,
                    blocks: CallBlocks, kbar):
    """Block masks of the sampled query blocks for every (similarity, threshold) candidate,
    plus a last "keep everything" mask whose error is the quantization floor.

    ksm: smoothed fp32 K; k_i8, k_scale: its int8 blocks; kbar: the fill estimate's mean keys
    (mean_keys_i8) or None without the estimate. Config x = s*C + c is stacked as heads
    x*H .. x*H+H-1 of one select_blocks call. Returns masks (X = S*C + 1, B, H, Sq, NK) bool and
    the fill bias (B, H, Sq, NK) or None."""
    H, Sn, C = blocks.heads, sims.numel(), cands.numel()
    Xc = Sn * C
    q_pool, q_sim = _pooled_queries(q_rows, row_valid, blocks.block_q)
    scores, k_pool, k_sim, fill_bias = _key_side(q_pool, ksm, k_i8, k_scale, scoring, blocks, kbar)
    scores = None if scores is None else scores.repeat(1, Xc, 1, 1)
    k_pool = None if k_pool is None else k_pool.repeat(1, Xc, 1, 1)
    k_sim = None if k_sim is None else k_sim.repeat(1, Xc, 1)
    thr_x = cands.repeat(Sn).repeat_interleave(H)  # head x*H + h of config x = s*C + c
    sim_x = sims.repeat_interleave(C).repeat_interleave(H)
    sel_params = SpargeParams(simthreshd1=sim_x, pvthreshd=math.inf, scoring=scoring,
                              **{"cdfthreshd" if mode == "cdf" else "topk": thr_x})
    masks = select_blocks(q_pool.repeat(1, Xc, 1, 1), q_sim.repeat(1, Xc, 1), k_pool, k_sim, sel_params,
                          blocks.scale, blocks.n, blocks.n, blocks.block_q, blocks.block_k, scores)
    B, _, Sq, NK = masks.shape
    masks = masks.view(B, Xc, H, Sq, NK).permute(1, 0, 2, 3, 4)
    return torch.cat([masks, torch.ones_like(masks[:1])]), fill_bias
