"""The one interface through which features plug into the override (nodes/override.py).

An observer is handed to `install(..., observers=[...])` (or made by the override from its config:
the error check and a loaded profile). The override calls, in this order:

  run_started(run, model_patcher)   a sampling run starts (OUTER_SAMPLE); model_patcher may be None
  forward_started(ctx)              a model forward starts (APPLY_MODEL), with its ForwardContext
  before_sparse(call) -> reason     an eligible call is about to run sparse; a reason string makes it
                                    run dense instead (counted under that reason), None lets it run
  choose_params(call, params)       -> the SpargeParams the call runs with (steering: e.g. per-head
                                    thresholds that adapt); return `params` to leave them
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
    """An eligible self-attention call, as observers see it."""

    func: Any  # ComfyUI's attention function (the dense path)
    args: tuple
    kwargs: dict
    run: Any  # RunStats of the run in progress, or None
    ctx: Any  # ForwardContext of the forward, or None
    layer: Optional[int]
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor
    v: torch.Tensor
    grid: Optional[tuple]  # Hilbert token grid, None without
    keep_keys: Any  # key padding (eligibility.key_padding), None without


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

    def after_sparse(self, call: ObservedCall, out: torch.Tensor) -> None:
        pass

    def forward_finished(self, ctx) -> None:
        pass

    def run_finished(self, run, completed: bool) -> None:
        pass

    def readout(self, run) -> dict:
        return {}
