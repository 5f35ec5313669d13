"""Holding an error target online: measure the error of a sparse call on a few sampled query rows
against exact attention, and move each head's share-mode threshold (minshare) toward the target.

Why online: a fixed minshare gives a different error on another model, resolution, head or step
(diffuse heads keep most blocks at a tiny error, content-matching heads land far below their
level). The error of a head is what the user cares about, so it is measured, per head, on the
user's own call:

    rel_l1[h] = sum over sampled rows r and channels d of |out - exact| / sum |exact|

`sampled_error` computes the two sums for R random query rows: exact attention of R rows costs
R / N of a dense call (256 rows at Wan 480p: 0.8%), against the whole sparse call's ~10%.

`BlockController` (what the node uses) holds one minshare per transformer block, moved so the
block's whole-output error sits at the target, with a lower minshare only for heads that err far
above it; `ThresholdController` is the stepping rule, for one value or one per head.
`ThresholdController` moves minshare in log space. Error grows like a power of minshare
(on the realistic benchmark, rel-L1 ~ minshare^alpha with alpha 0.45-0.65 between the presets),
so one step m' = m * (target / e)^(1 / alpha) lands near the target; alpha is re-estimated per head
from its last two measurements (a secant step), clamped, and a step is limited to 4x either way (the
first) or 2x (later ones). Inside a deadband around the target nothing moves (the estimate from a few hundred rows is
noisy). Thresholds live in one (H,) float32 CPU tensor per controller that is updated in place,
so a call that holds it (or a compiled graph that takes it as an input) sees the new values
without being rebuilt, and nothing here reads a device value.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .call_graphs import layout_key
from .params import MAX_MINSHARE

DEFAULT_ROWS = 256  # sampled query rows per measured call
ALPHA = 0.7  # d ln(rel-L1) / d ln(minshare) before a head has two measurements
# Secant slopes from two noisy measurements close together can be tiny; below 0.4 a step would
# jump several-fold on noise (seen on the small-grid tests), above 1.5 it would barely move.
ALPHA_RANGE = (0.4, 1.5)
FIRST_STEP = math.log(4.0)  # the first update may move a head 4x up or down
MAX_STEP = math.log(2.0)  # later ones 2x: near the target the measurements' noise dominates
MIN_SHARE = 0.02  # below this share mode keeps nearly every block: the lower end of the search
UP_DAMPING = 0.5
DEADBAND = 0.12  # |ln(e / target)| below ln(1 + DEADBAND): leave the head as it is
BRACKET_CLOSE = 1.25  # safe and missing minshare this close: settle on the safe one
BRACKET_AGE = 8  # updates after which a bracket end is forgotten
# ... but a missing end that erred CLIFF_OVER x the target or more only after this many times that:
# re-trying it costs a whole forward of that block at its error (0.9 rel-L1 in the first block of a
# random-weight WanModel, tried again twice in a 30-step run with the plain age)
OVER_HOLD = 4
SEED_AGE = 3  # ... and one seeded from another block after this many
SEED_AGREE = 2.0  # ... or at once, when this block's error near the seed's safe minshare differs by more
# A bracket spans a jump (not a steep but smooth curve) when the error grows faster than
# minshare^CLIFF_SLOPE between its ends and the missing end is well over the target.
CLIFF_SLOPE = 3.0
CLIFF_OVER = 2.0
CLIFF_SPAN = 2.5  # ... and its ends are at most this far apart
HEAD_CAP = 1.6  # BlockController: a head whose error passes this x target gets its own, lower minshare
HEAD_RELAX = 1.25  # ... and moves back toward the block's by this factor per update once below target
MIN_FACTOR = 1.0 / 64


@torch.no_grad()
def sampled_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
                  scale: Optional[float] = None, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(2, H) float64 on q's device: per head, sum |out - exact| and sum |exact| over the query
    `rows` (token indices) of every batch item. q/out (B, H, N, D), k/v (B, Hkv, Nk, D), the
    exact attention in q's dtype (what the model would have computed), no host sync. With `acc`
    ((2, H) float64) the sums are added into it, and it is returned.

    On a GPU with Triton, fp16/bf16 and D <= 256 this is two launches (kernels/sampled_error.py:
    the split-K exact rows, then the merge and the sums); elsewhere `exact_sums`, in torch."""
    if q.is_cuda and kernel_measures(*(layout_key(t) for t in (q, k, v, out))):
        from ..kernels.sampled_error import sampled_error_sums

        return sampled_error_sums(q, k, v, out, rows, acc, scale)
    sums = exact_sums(q, k, v, out, rows, scale)
    return sums if acc is None else acc.add_(sums)


def kernel_measures(lq: tuple, lk: tuple, lv: tuple, lo: tuple) -> bool:
    """Whether the measurement kernels (kernels/sampled_error.py) take q, k, v and out of these
    layouts (call_graphs.layout_key: the (B, H, N, D) shape, strides, dtype) and Triton runs here.
    Every check their launcher makes: a launch that raised inside a CUDA graph's capture would turn
    the run's graphs off (sparge_core.graphed.measure_graphed), the sparse calls' too."""
    if any(len(lay[0]) != 4 for lay in (lq, lk, lv, lo)):
        return False
    (B, H, _, D), dtype = lq[0], lq[2]
    Bk, Hkv, Nk, Dk = lk[0]
    if (dtype not in (torch.float16, torch.bfloat16) or D > 256 or lo[0] != lq[0] or lk[0] != lv[0]
            or (Bk, Dk) != (B, D) or Nk == 0 or Hkv == 0 or H % Hkv or {lk[2], lv[2], lo[2]} != {dtype}
            or any(lay[1][3] != 1 for lay in (lq, lk, lv, lo))):
        return False
    from .availability import triton_status

    return triton_status().available


def exact_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
               scale: Optional[float] = None) -> torch.Tensor:
    """sampled_error's sums in torch ops (~17 launches; the reference of the kernels): SDPA of
    the sampled rows, rounded to q's dtype."""
    qr = q.index_select(2, rows)
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    exact = F.scaled_dot_product_attention(qr, k, v, scale=scale).to(q.dtype)
    d = torch.stack([out.index_select(2, rows), exact]).float()
    d[0] -= d[1]
    return d.abs_().sum((1, 3, 4)).double()


def sample_rows(n: int, count: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`count` random token indices in [0, n) on the device (repeats allowed; no host sync)."""
    return torch.randint(0, n, (min(count, n),), device=device, generator=generator)


class ThresholdController:
    """Per-head minshare of one transformer block, moved toward `target` by measured errors.

    Besides the secant step each head keeps a bracket: the last minshare that met the target
    (`safe`) and the last that missed it (`over`). Where error jumps with minshare (near-uniform
    attention: every block's share is about even, so a small change of minshare drops most of
    them at once) the secant would swing across the jump forever; the bracket bisects it instead
    and settles on the safe side once the two are within BRACKET_CLOSE. Bracket ends older than
    BRACKET_AGE updates are forgotten, since attention changes over the denoising steps."""

    def __init__(self, target: float, init: float, heads: int):
        if not (target > 0):
            raise ValueError(f"target rel-L1 must be > 0, got {target}")
        self.target = float(target)
        self.thresholds = torch.full((heads,), float(init), dtype=torch.float32)
        self.last_error = torch.full((heads,), float("nan"), dtype=torch.float64)
        self._prev: list = [None] * heads  # (ln minshare, ln error) of the measurement before
        self._safe: list = [None] * heads  # (minshare, error, update index) that met the target
        self._over: list = [None] * heads  # (minshare, error, update index) that missed it
        self._seeded: list = [None] * heads  # the (safe, over) ends another block gave, while kept
        self.updates = 0

    def update(self, sums: torch.Tensor) -> None:
        """Move each head from its measured sums (2, H) (CPU: sampled_error's result, read back)."""
        diff, ref = sums[0].tolist(), sums[1].tolist()
        new = self.thresholds.tolist()
        for h, (d, r) in enumerate(zip(diff, ref)):
            if not (r > 0) or not math.isfinite(d):
                continue
            e = max(d / r, 1e-6)
            self.last_error[h] = e
            self._check_seed(h, new[h], e)
            self._bracket(h, new[h], e)
            new[h] = self._within_bracket(h, self._step(h, new[h], e))
        self.thresholds.copy_(torch.tensor(new, dtype=torch.float32))
        self.updates += 1

    def brackets(self) -> tuple:
        """The heads' median (minshare, error) that met the target and that missed it, or Nones."""
        def med(side):
            vals = sorted(x[:2] for x in side if x is not None)
            return vals[len(vals) // 2] if vals else None
        return med(self._safe), med(self._over)

    def seed(self, safe: Optional[tuple], over: Optional[tuple]) -> None:
        """Start every head with a bracket learned elsewhere (another block of the same model). It
        counts for SEED_AGE of this controller's own updates only: another block may be the odd
        one out (a first block that sees the raw patch embedding, say)."""
        born = self.updates - (BRACKET_AGE - SEED_AGE)
        for h in range(len(self._safe)):
            self._safe[h] = None if safe is None else (*safe, born, "seeded")
            self._over[h] = None if over is None else (*over, born, "seeded")
            self._seeded[h] = (self._safe[h], self._over[h])

    def _check_seed(self, h: int, m: float, e: float) -> None:
        """Forget a seeded bracket as soon as this block's own error, measured near the seed's safe
        minshare, is more than SEED_AGREE x off the seed's there: its curve is another block's.
        (On a random-weight WanModel the first block alone had a cliff; its seed held the other 29
        blocks at a fifth of their target for a third of the run.)"""
        seeded = self._seeded[h]
        if seeded is None:
            return
        safe = seeded[0]
        if safe is None or abs(math.log(max(m, 1e-9) / max(safe[0], 1e-9))) > math.log(BRACKET_CLOSE):
            return
        if not (safe[1] / SEED_AGREE <= e <= safe[1] * SEED_AGREE):
            if self._safe[h] is seeded[0]:
                self._safe[h] = None
            if self._over[h] is seeded[1]:
                self._over[h] = None
        self._seeded[h] = None  # checked once: it agrees, or it is gone

    def _bracket(self, h: int, m: float, e: float) -> None:
        for side in (self._safe, self._over):
            if side[h] is None:
                continue
            own_miss = side is self._over and len(side[h]) == 3 and side[h][1] >= CLIFF_OVER * self.target
            hold = OVER_HOLD if own_miss else 1  # (a seeded end, 4 long, keeps the plain age)
            if self.updates - side[h][2] > BRACKET_AGE * hold:
                side[h] = None
        if e <= self.target * (1 + DEADBAND):
            self._safe[h] = (m, e, self.updates)
            if self._over[h] is not None and self._over[h][0] <= m:
                self._over[h] = None
        else:
            self._over[h] = (m, e, self.updates)
            if self._safe[h] is not None and self._safe[h][0] >= m:
                self._safe[h] = None

    def _within_bracket(self, h: int, m: float) -> float:
        safe, over = self._safe[h], self._over[h]
        if over is None:
            return m
        if safe is not None and m > safe[0] and self._is_cliff(safe, over):
            # a cliff (the error jumps many-fold between the two): no minshare in between holds the
            # target, so stay on the safe side until the bracket is forgotten
            return safe[0]
        if m < over[0] / BRACKET_CLOSE:
            return m
        lo = safe[0] if safe is not None else over[0] / 4
        if lo <= MIN_SHARE:
            return 0.0 if over[0] <= MIN_SHARE * 2 else math.sqrt(MIN_SHARE * over[0])
        if over[0] / lo < BRACKET_CLOSE:
            return lo  # the jump is found: stay on its safe side
        return math.sqrt(lo * over[0])

    def on_cliff(self) -> bool:
        """Whether the heads' median bracket is a cliff (see _within_bracket)."""
        safe, over = self.brackets()
        return safe is not None and over is not None and self._is_cliff(safe, over)

    def _is_cliff(self, safe: tuple, over: tuple) -> bool:
        if over[1] < CLIFF_OVER * self.target or over[0] <= safe[0] or over[0] / max(safe[0], 1e-9) > CLIFF_SPAN:
            return False  # (a wide bracket may hide a smooth stretch: bisect it instead)
        slope = math.log(over[1] / max(safe[1], 1e-9)) / math.log(over[0] / max(safe[0], 1e-9))
        return slope > CLIFF_SLOPE

    def _step(self, h: int, m: float, e: float) -> float:
        gap = math.log(self.target / e)
        prev, self._prev[h] = self._prev[h], (math.log(max(m, MIN_SHARE)), math.log(e))
        if abs(gap) < math.log1p(DEADBAND):
            return m
        if m < MIN_SHARE:  # keeping (nearly) every block
            return MIN_SHARE if gap > 0 else m
        alpha = ALPHA
        if prev is not None and abs(math.log(m) - prev[0]) > 0.05:
            alpha = (math.log(e) - prev[1]) / (math.log(m) - prev[0])
            alpha = min(max(alpha, ALPHA_RANGE[0]), ALPHA_RANGE[1])
        limit = FIRST_STEP if prev is None else MAX_STEP
        step = gap / alpha
        if step > 0:  # toward more skipping: half steps, since overshooting the target is what users see
            step *= UP_DAMPING
        step = min(max(step, -limit), limit)
        m2 = m * math.exp(step)
        if m2 < MIN_SHARE:
            return 0.0  # the target needs (nearly) everything: keep every block
        return min(m2, MAX_MINSHARE)


class BlockController:
    """The share-mode thresholds of one transformer block: one minshare for the block, moved so
    the block's whole-output error (pooled over its heads) sits at `target`, times a factor per
    head that only comes down where a head's own error passes HEAD_CAP x target.

    Why not each head at the target on its own: for a given whole-output error that allocation
    costs more blocks (a head whose error grows slowly with minshare can take more skipping than
    one whose error climbs fast; equal per-head errors give that up). On the robustness benchmark
    per-head targets ran 1.1-1.2x slower than one minshare per block at the same whole error. The
    cap keeps the worst head within the issue's 2x of the target.

    Same interface as ThresholdController: `thresholds` ((H,) CPU tensor, updated in place),
    `update(sums)`, `last_error`, `updates`, `brackets()`, `seed()`, `on_cliff()`."""

    def __init__(self, target: float, init: float, heads: int):
        self.target = float(target)
        self._block = ThresholdController(target, init, 1)  # the block's minshare, as one unit
        self.factors = [1.0] * heads
        self.thresholds = torch.full((heads,), float(init), dtype=torch.float32)
        self.last_error = torch.full((heads,), float("nan"), dtype=torch.float64)
        self.updates = 0

    def update(self, sums: torch.Tensor) -> None:
        """Move from measured per-head sums (2, H) (CPU)."""
        diff, ref = sums[0].tolist(), sums[1].tolist()
        block = sum(diff) / sum(ref) if sum(ref) > 0 else float("nan")
        if sum(ref) > 0:
            self._block.update(torch.tensor([[sum(diff)], [sum(ref)]], dtype=torch.float64))
        for h, (d, r) in enumerate(zip(diff, ref)):
            if r > 0 and math.isfinite(d):
                e = max(d / r, 1e-6)
                self.last_error[h] = e
                self.factors[h] = self._factor(self.factors[h], e, block)
        m = float(self._block.thresholds[0])
        self.thresholds.copy_(torch.tensor([m * f for f in self.factors], dtype=torch.float32))
        self.updates += 1

    def _factor(self, f: float, e: float, block: float) -> float:
        # only a head far above the block's own error: where the whole block is over the target,
        # the block's minshare comes down already (both together would overshoot many-fold)
        cap = HEAD_CAP * max(self.target, block if math.isfinite(block) else 0.0)
        if e > cap:  # this head errs well above the block: it keeps more blocks than the others
            return max(f * max((cap / e) ** (1.0 / ALPHA), 0.25), MIN_FACTOR)
        if e < self.target and f < 1.0:  # back toward the block's minshare
            return min(1.0, f * HEAD_RELAX)
        return f

    @property
    def block_error(self) -> float:
        """The block's pooled rel-L1 at its last update (nan before one)."""
        return float(self._block.last_error[0])

    def brackets(self) -> tuple:
        return self._block.brackets()

    def on_cliff(self) -> bool:
        """Whether the block's minshare sits on the safe side of a cliff of its error."""
        return self._block.on_cliff()

    def seed(self, safe: Optional[tuple], over: Optional[tuple]) -> None:
        self._block.seed(safe, over)
