"""What the override records: per call (CallRecord), per model forward (ForwardContext), per step
(StepStats) and per sampling run (RunStats), and `fold_forward`, which adds a forward's records to
its run. Every field is declared here, including those the observers fill (error check, profile
notes, calibration), so nothing is attached to these objects from outside.

Counts of sparse calls are (2,) int64 device vectors, [kept, P.V-skipped] (a graphed call's are a
row of its counts ring; no host sync either way); a forward's are stacked once, summed on the
device and read once, when the readout is built at the end of the run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

from .capture import keep_step_mask


def start_timing(q: torch.Tensor):
    """(start, end) CUDA events of one call (verbose), start recorded now; None off CUDA."""
    if q.device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    return start, end


class CallRecord(NamedTuple):
    """One sparse call."""

    counts: torch.Tensor  # (2,) int64 on the device: [computed query-block x key-block pairs, of them P.V-skipped]
    total: int  # pairs a dense call computes
    flops: float  # attention FLOPs of the call at full cost
    fill_flops: float  # FLOPs of the skipped-block estimate (fill_skipped), else 0
    layer: Optional[int]  # transformer block

    @property
    def kept(self) -> torch.Tensor:
        return self.counts[0]

    @property
    def pv_skipped(self) -> torch.Tensor:
        return self.counts[1]


@dataclass(eq=False)
class ForwardContext:
    """What the override needs to know about, and records during, one model forward."""

    step: Optional[int]
    sigma: Optional[float]
    percent: Optional[float]
    sparse_on: bool  # inside the node's start/end window
    grids: tuple  # candidate (t, h, w) token grids of the latent (ceil and floor patching)
    context_tokens: Optional[int]  # text tokens (joint attention puts them after the grid)
    n_double: int  # HunyuanVideo-style double blocks: single block i is layer n_double + i
    capture_layer: Optional[int] = None  # block whose block mask is captured (None: no capture)
    self_attn_calls: int = 0
    max_layer: int = -1
    records: list = field(default_factory=list)  # CallRecord per sparse call
    dense: dict = field(default_factory=dict)  # reason -> calls
    dense_flops: float = 0.0
    hilbert_used: int = 0
    hilbert_not: dict = field(default_factory=dict)  # reason -> sparse calls without Hilbert order
    last_grid: Optional[tuple] = None
    last_tail: Optional[int] = None
    backends: set = field(default_factory=set)
    events: list = field(default_factory=list)  # (start, end) CUDA events of sparse calls (verbose)
    mask_cache: dict = field(default_factory=dict)  # attention mask -> key padding (eligibility)
    first_seen: list = field(default_factory=list)  # (reason, description) for verbose logs
    map_mask: Optional[tuple] = None  # (packed uint8 (H, NQ, ceil(NK/8)) on the device, NK) of capture_layer
    map_dense: dict = field(default_factory=dict)  # reason -> calls of capture_layer that ran dense
    cur_layer: Optional[int] = None  # block index of the call in progress (for map_dense)

    @property
    def record_layers(self) -> list:
        return [r.layer for r in self.records]

    def record_sparse(self, record: CallRecord, backend: str, grid, tail, why_not, timing=None) -> None:
        """A sparse call: its counts, backend, Hilbert order (its grid, or why not) and, verbose, its
        CUDA events."""
        self.records.append(record)
        self.backends.add(backend)
        if grid is not None:
            self.hilbert_used += 1
            self.last_grid, self.last_tail = grid, tail
        else:
            self.hilbert_not[why_not] = self.hilbert_not.get(why_not, 0) + 1
        if timing is not None:
            self.events.append(timing)


@dataclass(eq=False)
class StepStats:
    step: int
    sigma: Optional[float]
    forwards: int = 0
    sparse_calls: int = 0
    kept: Any = 0  # device tensor once a sparse call ran
    total: int = 0
    pv_skipped: Any = 0
    dense: dict = field(default_factory=dict)
    flops_total: float = 0.0  # every call, dense and sparse, at full cost
    flops_dense: float = 0.0  # calls that ran dense
    flops_sparse_computed: Any = 0.0  # device tensor (sum of kept * flops / total + fill)
    layer_parts: list = field(default_factory=list)  # (blocks, kept per call (device int64 vector), totals) per forward


@dataclass(eq=False)
class RunStats:
    """One sampling run. `RunStats.start(sigmas)` at its start."""

    n_steps: Optional[int] = None
    t0: float = field(default_factory=time.monotonic)
    steps: dict = field(default_factory=dict)  # step (-1: unknown) -> StepStats
    forwards: int = 0
    forwards_skipped: int = 0  # forwards with no attention call: a step cache (EasyCache) reused an output
    hilbert_used: int = 0
    hilbert_not: dict = field(default_factory=dict)
    grid: Optional[tuple] = None
    tail: Optional[int] = None
    backends: set = field(default_factory=set)
    events: list = field(default_factory=list)
    max_layer: int = -1
    first_seen: dict = field(default_factory=dict)
    n_layers: Optional[int] = None  # transformer blocks of the model (from the diffusion model)
    # sparsity map (nodes/capture.py)
    map_layer: Optional[int] = None
    map_masks: dict = field(default_factory=dict)  # step -> (packed uint8 device tensor, NK, sigma)
    map_bytes: int = 0
    map_dropped: int = 0  # steps not kept (capture.MAP_MAX_BYTES)
    map_dense: dict = field(default_factory=dict)
    # filled by observers
    error_sums: dict = field(default_factory=dict)  # block -> [float64 (5,) device sums, calls] (error_check.py)
    profile_notes: list = field(default_factory=list)  # resolution notes of a loaded profile (profile_use.py)
    calibration: Optional[dict] = None  # the Sparge Calibrate node's summary (calibration.py)
    adapt_sums: dict = field(default_factory=dict)  # block -> [(2, H) CPU float64 error sums, calls] (adapt.py)

    @classmethod
    def start(cls, sigmas=None) -> "RunStats":
        n = None
        if isinstance(sigmas, torch.Tensor) and sigmas.dim() > 0:
            n = max(0, int(sigmas.shape[-1]) - 1)
        return cls(n_steps=n)

    def step(self, step, sigma) -> StepStats:
        key = -1 if step is None else int(step)
        st = self.steps.get(key)
        if st is None:
            st = self.steps[key] = StepStats(key, sigma)
        return st

    def dense_calls(self) -> dict:
        """reason -> dense calls over the run's steps."""
        out: dict = {}
        for st in self.steps.values():
            for r, n in st.dense.items():
                out[r] = out.get(r, 0) + n
        return out

    def blocks_with_sparse_calls(self) -> set:
        return {b for st in self.steps.values() for part in st.layer_parts for b in part[0] if b is not None}


def _add_counts(into: dict, counts: dict) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0) + n


def fold_forward(run: RunStats, ctx: ForwardContext) -> None:
    """Add one forward's records to its step and run (device sums only: no host sync)."""
    if not ctx.records and not ctx.dense:
        # no attention call reached the override: the diffusion model did not run (EasyCache's
        # DIFFUSION_MODEL wrapper, inside ours, returned a cached output), so this is not a step run
        run.forwards_skipped += 1
        return
    st = run.step(ctx.step, ctx.sigma)
    st.forwards += 1
    run.forwards += 1
    _add_counts(st.dense, ctx.dense)
    st.flops_total += ctx.dense_flops
    st.flops_dense += ctx.dense_flops
    recs = ctx.records
    if recs:
        # a handful of device ops per forward, whatever its number of calls
        counts = torch.stack([r.counts for r in recs])
        kept_vec, sums = counts[:, 0], counts.sum(0)
        st.kept = st.kept + sums[0]
        st.layer_parts.append((tuple(r.layer for r in recs), kept_vec, tuple(r.total for r in recs)))
        st.pv_skipped = st.pv_skipped + sums[1]
        per_pair = {r.flops / r.total for r in recs}  # FLOPs of one computed pair: one value per call shape
        if len(per_pair) == 1:
            computed = sums[0].double() * per_pair.pop()
        else:
            computed = torch.stack([r.counts[0].double() * (r.flops / r.total) for r in recs]).sum()
        st.flops_sparse_computed = st.flops_sparse_computed + computed + sum(r.fill_flops for r in recs)
        st.total += sum(r.total for r in recs)
        st.flops_total += sum(r.flops for r in recs)
        st.sparse_calls += len(recs)
    run.hilbert_used += ctx.hilbert_used
    _add_counts(run.hilbert_not, ctx.hilbert_not)
    if ctx.last_grid is not None:
        run.grid, run.tail = ctx.last_grid, ctx.last_tail
    run.backends |= ctx.backends
    run.events.extend(ctx.events)
    run.max_layer = max(run.max_layer, ctx.max_layer)
    for reason, desc in ctx.first_seen:
        run.first_seen.setdefault(reason, desc)
    if ctx.capture_layer is not None:
        run.map_layer = ctx.capture_layer
        _add_counts(run.map_dense, ctx.map_dense)
        if ctx.map_mask is not None:
            keep_step_mask(run, st.step, ctx.map_mask, ctx.sigma)
