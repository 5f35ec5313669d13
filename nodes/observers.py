"""The one interface through which features plug into the override (nodes/override.py).

An observer is handed to `install(..., observers=[...])` (or made by the override from its config:
the error check and a loaded profile). The override calls, in this order:

  run_started(run, model_patcher)   a sampling run starts (OUTER_SAMPLE); model_patcher may be None
  forward_started(ctx)              a model forward starts (APPLY_MODEL), with its ForwardContext
  before_sparse(call) -> reason     an eligible call is about to run sparse; a reason string makes it
                                    run dense instead (counted under that reason), None lets it run
  choose_params(call, params)       -> the SpargeParams the call runs with (steering: e.g. per-head
                                    thresholds that adapt); return `params` to leave them
  measure_in_graph(call) -> request a GraphMeasure when the observer will measure this call's error
                                    (adapt.sampled_error), else None: asked only of a call that may
                                    replay its CUDA graph; the first observer's request runs inside
                                    that graph (one replay, not two)
  measured(call, acc)               that request's sums, before after_sparse (a request the replay
                                    could not serve gets none: measure in after_sparse as usual)
  after_sparse(call, out)           the sparse call returned `out` (in the caller's layout)
  forward_finished(ctx)             the forward is done (its calls are queued, maybe not run yet)
  run_finished(run, completed)      the run ended, before its readout is built; raising here fails
                                    the sampler node after the readout is published
  readout(run) -> dict              keys added to the run's readout

before_sparse and after_sparse run inside the attention call: under torch.compile they must be
`torch.compiler.disable`d where they do more than read plain values, and they must not read device
values (no host sync per call). Observers keep what they record in their declared RunStats fields.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch


class ObservedCall(NamedTuple):
    """An eligible self-attention call, as observers see it. Its q, k, v as (B, H, N, D) come from
    `qkv_of(call)`: the override makes them on first use (an unmeasured call through a CUDA graph
    never needs them: three views of host time less per call)."""

    func: Any  # ComfyUI's attention function (the dense path)
    args: tuple
    kwargs: dict
    run: Any  # RunStats of the run in progress, or None
    ctx: Any  # ForwardContext of the forward, or None
    layer: Optional[int]
    heads: int
    tokens: int  # query tokens
    qkv: Any  # (q, k, v), or a LazyQKV; read through qkv_of
    grid: Optional[tuple]  # Hilbert token grid, None without
    keep_keys: Any  # key padding (eligibility.key_padding), None without
    # q, k, v as the caller passed them, and their head count when they are (B, N, H*D) (None: split)
    raw: Optional[tuple] = None
    graphs: Any = None  # the sampling run's CallGraphs (sparge_core/call_graphs.py), None outside one or compiled


class GraphMeasure(NamedTuple):
    """A measurement of a call's error asked of its CUDA graph (sparge_core.graphed.replay_measured):
    `rows` sampled query rows drawn from `seed`, their sums added into `acc` ((2, H) float64 on the
    call's device) or into a fresh one when acc is None."""

    rows: int
    seed: int
    acc: Optional[torch.Tensor] = None


class LazyQKV:
    """q, k, v made by `make()` on first use, then kept."""

    def __init__(self, make):
        self._make, self._qkv = make, None

    def get(self) -> tuple:
        if self._qkv is None:
            self._qkv = self._make()
        return self._qkv


def qkv_of(call: ObservedCall) -> tuple:
    """(q, k, v) of an observed call, (B, H, N, D). A plain function (not a method of the named
    tuple): torch.compile traces the override, where qkv is the tuple itself."""
    qkv = call.qkv
    return qkv if isinstance(qkv, tuple) else qkv.get()


class Observer:
    """Base of the observers: every hook does nothing, so each feature writes only what it uses."""

    def run_started(self, run, model_patcher) -> None:
        pass

    def forward_started(self, ctx) -> None:
        pass

    def before_sparse(self, call: ObservedCall) -> Optional[str]:
        return None

    def choose_params(self, call: ObservedCall, params):
        return params

    def measure_in_graph(self, call: ObservedCall) -> Optional[GraphMeasure]:
        return None

    def measured(self, call: ObservedCall, acc: torch.Tensor) -> None:
        pass

    def after_sparse(self, call: ObservedCall, out: torch.Tensor) -> None:
        pass

    def forward_finished(self, ctx) -> None:
        pass

    def run_finished(self, run, completed: bool) -> None:
        pass

    def readout(self, run) -> dict:
        return {}
