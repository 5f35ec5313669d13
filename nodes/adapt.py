"""Holding the preset's error target on the user's model (an observer of the override,
nodes/observers.py; the numerics are sparge_core/adapt.py).

Which calls are measured: every block on the run's first two sparse forwards (so the thresholds
settle early), then block b at step s when (s + b) % MEASURE_EVERY == 0 (each block every
MEASURE_EVERY steps, staggered so every step carries the same share of the cost), and a block
whose thresholds were just raised on its next call (a raise can cross a cliff of the error: with
near-uniform attention every block's share is about even, and a small rise of minshare drops most
of them at once; the check bounds such a miss to one forward). A measured call also computes
exact attention for DEFAULT_ROWS random query rows (sampled_error: per-head sums on the device,
added into the block's sums of the forward by the kernels, no sync; in a sampling run inside the
call's own CUDA graph, sparge_core.graphed.replay_measured, or through a graph of its own,
measure_graphed, when the call ran launched). After the forward the sums of
its measured blocks are copied to pinned host memory without blocking; the copy is read when it
has landed, at the start of a later forward, and each measured block's BlockController moves its
minshare (and, for a head that errs far above the target, that head's own). So the steady state
has no host-device sync per call, and the thresholds a call uses are plain CPU tensors (as a
profile's are).

Only share mode moves thresholds (the presets; Custom in share mode with a target). Other modes, and
the blocks a loaded profile calibrated, are measured but keep their thresholds.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..sparge_core.adapt import DEFAULT_ROWS, BlockController, sample_rows, sampled_error
from ..sparge_core.graphed import measure_graphed
from ..sparge_core.layout import split_heads
from ..sparge_core.params import MAX_MINSHARE
from . import sparse_call
from .observers import GraphMeasure, ObservedCall, Observer, qkv_of

log = logging.getLogger("sparge_attention")

MEASURE_EVERY = 4
WARMUP_FORWARDS = 2  # sparse forwards of a run in which every block is measured
PROBE_CALLS = 5  # at most, for each probed block
PROBE_BLOCKS = 2  # blocks probed at most: the first, and the next when the first sits on a cliff
PROBE_BAND = (0.8, 1.15)  # error / target at which the probe stops


def _graphable(call: ObservedCall) -> bool:
    """Whether the call's measurement may run through the sampling run's CUDA graphs (its own, or
    one of the measurement): a run with graphs, no key padding, and ComfyUI's q, k, v at hand."""
    return call.graphs is not None and call.keep_keys is None and call.raw is not None


class Adaptation(Observer):
    def __init__(self, target: float, profile=None, rows: int = DEFAULT_ROWS, seed: int = 0,
                 measure_only: bool = False):
        self.target = float(target)
        self.profile = profile  # a LoadedProfile: its calibrated blocks keep their thresholds
        self.measure_only = bool(measure_only)  # measure and report, never move a threshold
        self.rows = int(rows)
        self.seed = int(seed)
        self.controllers: dict = {}  # block -> BlockController (kept across runs: the model is the same)
        self._params: dict = {}  # block -> SpargeParams holding its controller's thresholds tensor
        self._generators: dict = {}  # device -> torch.Generator for the sampled rows
        self._pending: dict = {}  # block -> (2, H) device sums of the forward in progress
        self._inflight: list = []  # (blocks, host buffer, CUDA event or None) copies not applied yet
        self._verify: set = set()  # blocks whose thresholds just rose: measured on their next call
        self._run = None
        self._forwards = 0
        self._warned = False
        self._probed = 0  # blocks probed (kept with the controllers: once per node)
        self._draws = 0  # measurements through CUDA graphs: each draws its rows from its own seed
        self._served = None  # the call whose measurement its CUDA graph made (measured), until its after_sparse

    # ------------------------------------------------------------------ thresholds
    def choose_params(self, call: ObservedCall, params):
        layer = call.layer
        if layer is None or self.measure_only or params.mode != "share" or self._profile_fixes(layer):
            return params
        p = self._params.get(layer)
        if p is None or self.controllers[layer].thresholds.numel() != call.heads:
            p = self._start_block(layer, params, call.heads, call)
        return p

    def _profile_fixes(self, layer: int) -> bool:
        return self.profile is not None and self.profile.params_for_layer(layer, None) is not None

    @torch.compiler.disable
    def _start_block(self, layer: int, params, heads: int, call: ObservedCall):
        """A block's controller: it starts where the blocks seen before settled (their median
        minshare: a model's blocks err alike far more than the presets' tuning inputs and this
        model do), or, for the node's very first block, where a few probe calls put it.
        A probed block that settles on the safe side of a cliff (its error jumps many-fold between
        two close minshares: on random-weight Wan models the first block alone did, at 0.006
        against 0.62) says little about the others: the next block is probed from the preset too,
        and later blocks start from the blocks off a cliff (from the cliff's safe side only when
        every probed block sat on one)."""
        prior, brackets = self._prior()
        probe = prior is None and self._probed < PROBE_BLOCKS
        if prior is None and not probe:
            prior, brackets = self._prior(cliffs=True)
        init = torch.as_tensor(params.minshare, dtype=torch.float32).flatten()
        ctrl = BlockController(self.target, prior if prior is not None else float(init.mean()), heads)
        if prior is None and init.numel() == heads:
            ctrl.thresholds.copy_(init)
        if brackets is not None:
            ctrl.seed(*brackets)
        self.controllers[layer] = ctrl
        # one SpargeParams around the controller's tensor: its in-place updates reach the kernel without a
        # rebuild (SpargeParams.per_head caches device copies per value; the compiled op reads it live)
        p = self._params[layer] = dataclasses.replace(params, minshare=ctrl.thresholds)
        if probe:
            self._probed += 1
            self._probe(ctrl, p, call)
        return p

    def _prior(self, cliffs: bool = False):
        """(median minshare, (safe, missing) bracket) of the blocks measured so far that are not on a
        cliff (with cliffs: of all of them), or (None, None)."""
        measured = [c for c in self.controllers.values() if c.updates and (cliffs or not c.on_cliff())]
        vals = sorted(x for c in measured for x in c.thresholds.tolist())
        if not vals:
            return None, None
        ends = [c.brackets() for c in measured]
        safe = sorted(s for s, _ in ends if s is not None)
        over = sorted(o for _, o in ends if o is not None)
        return vals[len(vals) // 2], (safe[len(safe) // 2] if safe else None, over[len(over) // 2] if over else None)

    def _probe(self, ctrl: BlockController, params, call: ObservedCall) -> None:
        """Run a block a few times, measuring and moving its thresholds, until its error is within
        PROBE_BAND of the target (the node's first block, and see _start_block)."""
        for _ in range(PROBE_CALLS):
            try:
                out = sparse_call.run_sparse(*qkv_of(call), params, call.grid, call.keep_keys)[0]
                sums = self._sums(call, out).cpu()  # a host read: once, before the node's first sparse call
            except Exception as e:  # the call itself will fall back dense if the kernel cannot run
                log.warning("Sparge Attention: the error-target probe failed (%s: %s); thresholds start at the "
                            "preset's", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                return
            ctrl.update(sums)
            if PROBE_BAND[0] <= ctrl.block_error / self.target <= PROBE_BAND[1]:
                return

    # ------------------------------------------------------------------ measuring
    def _due(self, ctx, layer: Optional[int]) -> bool:
        if ctx is None or layer is None:
            return False
        if self._forwards <= WARMUP_FORWARDS or layer in self._verify:
            return True
        step = ctx.step if ctx.step is not None else self._forwards
        return (step + layer) % MEASURE_EVERY == 0

    def measure_in_graph(self, call: ObservedCall) -> Optional[GraphMeasure]:
        """A due call that may replay its CUDA graph is measured inside it (sparge_core.graphed.replay_measured):
        its rows drawn from the next seed, its sums added into the block's sums of this forward."""
        if not _graphable(call) or not self._due(call.ctx, call.layer):
            return None
        return GraphMeasure(self.rows, self._next_seed(), self._pending.get(call.layer))

    def measured(self, call: ObservedCall, acc: torch.Tensor) -> None:
        self._pending[call.layer] = acc
        self._verify.discard(call.layer)
        self._served = call  # its after_sparse measures nothing

    # not traced: which calls are due changes every forward, and a compiled model would guard on the
    # counters it reads and recompile per forward (it hit dynamo's recompile limit in 8 steps)
    @torch.compiler.disable
    def after_sparse(self, call: ObservedCall, out: torch.Tensor) -> None:
        if self._served is call:
            self._served = None
        elif self._due(call.ctx, call.layer):
            self._measure(call, out)

    @torch.compiler.disable
    def _measure(self, call: ObservedCall, out: torch.Tensor) -> None:
        try:
            # added into the block's sums of this forward (the kernels accumulate: no extra launch)
            self._pending[call.layer] = self._sums(call, out, self._pending.get(call.layer))
        except Exception as e:  # e.g. out of memory: the render goes on, this call is not measured
            if not self._warned:
                self._warned = True
                log.warning("Sparge Attention: an error-target measurement failed (%s: %s); calls that cannot be "
                            "measured keep their thresholds", type(e).__name__, str(e).splitlines()[0][:200])
            return
        self._verify.discard(call.layer)

    def _sums(self, call: ObservedCall, out: torch.Tensor, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The call's (2, H) error sums, added into acc when given: in a sampling run through its CUDA
        graphs (rows drawn from a seed in the kernels), else with rows from this observer's generator."""
        if _graphable(call):
            q, k, v, heads = call.raw
            got = measure_graphed(call.graphs, q, k, v, out, heads, self.rows, self._next_seed(), acc)
            if got is not None:
                return got
        q, k, v = qkv_of(call)
        o = out if out.dim() == 4 else split_heads(out, q.shape[1])
        rows = sample_rows(q.shape[2], self.rows, q.device, self._generator(q.device))
        if call.keep_keys is None:
            return sampled_error(q, k, v, o, rows, acc=acc)
        # key padding: exact attention over the keys the call kept
        kind, lists = call.keep_keys
        items = [(slice(None), lists[0])] if kind == "shared" else [(slice(b, b + 1), ix) for b, ix in enumerate(lists)]
        for sl, ix in items:
            ix = ix.to(k.device)
            acc = sampled_error(q[sl], k[sl].index_select(2, ix), v[sl].index_select(2, ix), o[sl], rows, acc=acc)
        return acc

    def _next_seed(self) -> int:
        """The seed of the next measurement through a CUDA graph (each draws its rows from its own)."""
        self._draws += 1
        return (self.seed * 1_000_003 + self._draws) & 0x7FFFFFFF

    def _generator(self, device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    # ------------------------------------------------------------------ forwards and runs
    def forward_started(self, ctx) -> None:
        self._forwards += 1
        self._apply(wait=False)

    def forward_finished(self, ctx) -> None:
        if not self._pending:
            return
        layers = sorted(self._pending)
        dev = self._pending[layers[0]].device
        stacked = torch.stack([self._pending[b] for b in layers])
        self._pending = {}
        if dev.type == "cuda":
            buf = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            buf.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._inflight.append((layers, buf, event))
        else:
            self._inflight.append((layers, stacked, None))

    def _apply(self, wait: bool) -> None:
        while self._inflight:
            layers, buf, event = self._inflight[0]
            if event is not None and not wait and not event.query():
                return  # not landed yet: a later forward applies it
            if event is not None:
                event.synchronize()
            self._inflight.pop(0)
            for b, sums in zip(layers, buf):
                self._record(b, sums)

    def _record(self, layer: int, sums: torch.Tensor) -> None:
        ctrl = self.controllers.get(layer)
        run = self._run
        if run is not None:
            entry = run.adapt_sums.setdefault(layer, [torch.zeros_like(sums), 0])
            entry[0] += sums
            entry[1] += 1
        if ctrl is None:  # measured only (not share mode, or a profile's block)
            return
        before = ctrl.thresholds.clone()
        ctrl.update(sums)
        if bool((ctrl.thresholds > before).any()):
            self._verify.add(layer)  # a head now skips more: check it on the next forward

    def run_started(self, run, model_patcher) -> None:
        self._run = run
        self._forwards = 0
        self._pending = {}

    def run_finished(self, run, completed: bool) -> None:
        self._apply(wait=True)  # the run's last measurements (one sync, at the end of the run)
        self._run = None

    def readout(self, run) -> dict:
        keys = sorted(run.adapt_sums)
        per_layer = {}
        diff = ref = 0.0
        for b in keys:
            s, calls = run.adapt_sums[b]
            d, r = s[0].tolist(), s[1].tolist()
            diff += sum(d)
            ref += sum(r)
            ctrl = self.controllers.get(b)
            per_layer[str(b)] = {
                "target": self.target,
                "rel_l1": [round(x / y, 6) if y > 0 else None for x, y in zip(d, r)],
                "calls": calls,
                "threshold": None if ctrl is None else [round(float(x), 4) for x in ctrl.thresholds.tolist()],
                "adapted": ctrl is not None,
            }
        measured = diff / ref if ref > 0 else None
        # blocks that skip every block they may and still err below the target: the target is out of
        # reach from below there (near-uniform attention), not missed by the controller
        sparsest = sum(1 for c in self.controllers.values() if float(c.thresholds.min()) >= MAX_MINSHARE)
        return {
            "target_rel_l1": self.target,
            "measured_rel_l1": measured,
            "adaptation": {"target_rel_l1": self.target, "measured_rel_l1": measured,
                           "measured_calls": sum(run.adapt_sums[b][1] for b in keys),
                           "rows_per_call": self.rows, "every_n_steps": MEASURE_EVERY,
                           "blocks_adapted": len(self.controllers), "blocks_at_sparsest": sparsest,
                           "per_layer": per_layer},
        }
