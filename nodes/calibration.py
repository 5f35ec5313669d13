"""Calibration during a sampling run, for the "Sparge Calibrate" node (nodes/calibrate_node.py). During the next sampling run of that model
it measures, on the user's own prompt and resolution, how far each block and head can be
sparsified within a target error, and writes the result as a profile
(models/sparge_profiles/<profile_name>.safetensors) for the Load Sparge Profile node.

How: the node installs a SpargeOverride (same eligibility rules, token-grid and Hilbert
learning, block counting, schedules of steps, readout) with a `Calibration` observer
(nodes/observers.py), whose before_sparse hands each eligible self-attention call to a
`sparge_core.calibrate.Calibrator` (on every `every_n_steps`-th step, once per block and
cond/uncond batch) and then has the call run DENSE through ComfyUI's own attention, so the run
follows its normal trajectory and its output is the normal output.
Each observation evaluates `sample_query_blocks` query blocks against every key for all
candidate thresholds at once (sparge_core/calibrate.py). Measured on an H100 (bf16, cond+uncond
batch of 2): 16 blocks cost 3.2x one dense attention call at Wan 480p (32,760 tokens; 8 blocks
2.0x), so observing every 4th step adds about 0.8x the run's attention time: the whole run costs
about 1-2 normal runs. Short sequences pay a fixed ~25 ms per observed call instead (22x a 1.2 ms
dense call at 7,800 tokens), still small in absolute terms.

The work shows on the node's own progress bar (comfy.utils.ProgressBar with its node id, one
tick per observed call). When the sampling run ends (the OUTER_SAMPLE wrapper) the per-head
choice is made (the worst observed call per candidate must meet the target), the profile is
written (safetensors: tensors + string metadata, never pickle) and a summary goes to the log and
to the run's readout (key "calibration", event "sparge.readout", GET /sparge/last_readout).
If nothing could be observed (e.g. every call shorter than min_tokens) the sampler node fails
with a message saying why, rather than leaving no profile silently.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..sparge_core.calibrate import Calibrator
from .model_info import model_shape
from .observers import ObservedCall, Observer, qkv_of
from .profile_files import LoadedProfile, profile_path

log = logging.getLogger("sparge_attention")

SCORING = "lse"  # the presets' stage-1 scoring (sparge_core/presets.py)
R_CALIBRATION = "calibration"  # dense reason: the call was observed, then ran dense

# skipped-call reasons (readout calibration.skipped)
S_MASK = "attention mask"
S_SIZE = "other token count or grid"
S_ERROR = "calibration error"


@dataclass(frozen=True)
class CalibrationSettings:
    profile_name: str
    target_l1: float = 0.05
    mode: str = "cdf"
    every_n_steps: int = 4
    sample_query_blocks: int = 16
    fill_skipped: bool = True  # measure (and later run) with the skipped blocks estimated, as the presets do


class CalibrationFailed(RuntimeError):
    pass


def _progress_bar(total, node_id):
    try:
        import comfy.utils

        return comfy.utils.ProgressBar(total, node_id=node_id)
    except Exception:  # pragma: no cover - not inside ComfyUI
        return None


def _finish_progress(node_id):
    if node_id is None:
        return
    try:
        from comfy_execution.progress import get_progress_state

        get_progress_state().finish_progress(str(node_id))
    except Exception:  # pragma: no cover - other ComfyUI versions
        pass


class Calibration(Observer):
    """Observes eligible self-attention calls for a profile and has every one of them run dense."""

    def __init__(self, settings: CalibrationSettings, min_tokens: int, node_id=None):
        self.settings = settings
        self.min_tokens = int(min_tokens)
        self.node_id = node_id
        self.cal: Optional[Calibrator] = None  # the Calibrator of the run in progress
        self.last_profile: Optional[LoadedProfile] = None  # written by the last finished run
        self._n_steps = 0
        self._shape: dict = {}
        self._keys: set = set()  # (step, block, cond_or_uncond) observed in this run
        self._steps: set = set()
        self._skipped: dict = {}
        self._warned: set = set()
        self._seconds = 0.0
        self._pbar = None
        self._done = 0
        self._total = 1

    def _tag(self) -> str:
        return f" [node {self.node_id}]" if self.node_id is not None else ""

    # ------------------------------------------------------------------ per run
    def run_started(self, run, model_patcher) -> None:
        s = self.settings
        self._n_steps = run.n_steps or 0
        self._shape = model_shape(model_patcher)
        self.cal = Calibrator(s.target_l1, mode=s.mode, scoring=SCORING, sample_query_blocks=s.sample_query_blocks,
                              fill=s.fill_skipped)
        self._keys, self._steps, self._skipped, self._warned = set(), set(), {}, set()
        self._seconds, self._done = 0.0, 0
        steps_to_observe = len(range(0, self._n_steps, s.every_n_steps)) if self._n_steps else 1
        self._total = max(1, steps_to_observe * (self._shape["blocks"] or 1))
        self._pbar = _progress_bar(self._total, self.node_id)

    def run_finished(self, run, completed: bool) -> None:
        try:
            if not completed:
                run.calibration = {"error": "the sampling run did not finish: no profile written", "file": None}
                return
            try:
                run.calibration = self._write_profile(run)
            except Exception as e:
                run.calibration = {"error": str(e), "file": None}
                log.error("Sparge Calibrate%s: %s", self._tag(), e)
                raise CalibrationFailed(f"Sparge Calibrate: {e}") from e
        finally:
            self.cal, self._pbar = None, None
            _finish_progress(self.node_id)

    def readout(self, run) -> dict:
        return {} if run.calibration is None else {"calibration": run.calibration}

    # ------------------------------------------------------------------ per call
    def before_sparse(self, call: ObservedCall) -> Optional[str]:
        if self.cal is not None and call.ctx is not None and call.layer is not None:
            # (under torch.compile the decorated _maybe_observe runs eagerly, behind a graph break)
            self._maybe_observe(call.ctx, call.layer, *qkv_of(call), call.grid, call.keep_keys,
                                call.kwargs.get("transformer_options"))
        return R_CALIBRATION

    @torch.compiler.disable
    def _maybe_observe(self, ctx, layer, qh, kh, vh, grid, keep_keys, to):
        step = ctx.step
        if step is not None and step % self.settings.every_n_steps:
            return
        cu = to.get("cond_or_uncond") if isinstance(to, dict) else None
        key = (step, int(layer), tuple(cu) if isinstance(cu, (list, tuple)) else None)
        if key in self._keys:  # a second forward of the same step (multi-stage samplers)
            return
        self._keys.add(key)
        if keep_keys is not None:
            # key padding (HunyuanVideo text): the calibration math is for plain self-attention
            self._skip(S_MASK)
            return
        t0 = time.perf_counter()
        try:
            self.cal.observe(int(layer), qh, kh, vh, grid=grid)
        except ValueError as e:
            msg = str(e)
            self._skip(S_SIZE if "token count or grid" in msg else S_ERROR, msg)
            return
        finally:
            self._seconds += time.perf_counter() - t0
        if step not in self._steps:
            self._steps.add(step)
            self.cal.mark_step()
        self._done += 1
        if self._pbar is not None:
            self._total = max(self._total, self._done)
            self._pbar.update_absolute(self._done, self._total)

    def _skip(self, reason, detail=None):
        self._skipped[reason] = self._skipped.get(reason, 0) + 1
        if detail and reason not in self._warned:
            self._warned.add(reason)
            log.warning("Sparge Calibrate%s: a call was not calibrated: %s", self._tag(), detail)

    # ------------------------------------------------------------------ the profile
    def _write_profile(self, run) -> dict:
        s, cal, shape = self.settings, self.cal, self._shape
        if cal.n_calls == 0:
            raise ValueError(self._nothing_observed(run))
        observed_max = max(cal.calls)
        n_layers = shape["blocks"] if shape["blocks"] and shape["blocks"] > observed_max else observed_max + 1
        prof = cal.result(model_family=shape["family"] or "unknown", n_layers=n_layers, steps=len(self._steps))
        prof.validate()
        path = profile_path(s.profile_name)
        layer_sp = [round(float(x), 6) for x in prof.sparsity.tolist()]
        layer_l1 = [round(float(x), 6) for x in prof.rel_l1.tolist()]
        meta = dict(prof.metadata())
        meta.update({
            "layer_sparsity": json.dumps(layer_sp), "layer_rel_l1": json.dumps(layer_l1),
            "every_n_steps": str(s.every_n_steps), "steps_run": str(self._n_steps),
            "created_by": "Sparge Calibrate node (ComfyUI)",
        })
        _save_atomically(prof.tensors(), meta, path)
        name = os.path.basename(path)
        self.last_profile = LoadedProfile(prof, name, path)
        log.info("Sparge Calibrate%s: wrote %s: %s; calibration took %.1f s over %d calls (%d of %d steps)",
                 self._tag(), path, prof.summary(), self._seconds, cal.n_calls, len(self._steps), self._n_steps)
        return self._summary(prof, path, layer_sp, layer_l1)

    def _nothing_observed(self, run) -> str:
        dense = run.dense_calls()
        dense.pop(R_CALIBRATION, None)
        why = ", ".join(f"{r} {n}" for r, n in sorted(dense.items())) or "none"
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(self._skipped.items()))
        return ("no self-attention call could be calibrated, so no profile was written (calls not eligible: "
                f"{why}{'; skipped: ' + skipped if skipped else ''}). Calls shorter than min_tokens="
                f"{self.min_tokens} are never sparse: lower min_tokens for small test videos.")

    def _summary(self, prof, path, layer_sp, layer_l1) -> dict:
        s = self.settings
        name = os.path.basename(path)
        calibrated = [i for i, c in enumerate(prof.calibrated.tolist()) if c]
        return {
            "file": f"sparge_profiles/{name}",
            "path": path,
            "profile_name": name,
            "model_family": prof.model_family,
            "layers": prof.layers,
            "heads": prof.heads,
            "n_tokens": prof.n_tokens,
            "grid": list(prof.grid) if prof.grid else None,
            "mode": prof.mode,
            "fill_skipped": prof.fill_skipped,
            "target_l1": prof.target_l1,
            "every_n_steps": s.every_n_steps,
            "sample_query_blocks": s.sample_query_blocks,
            "steps_run": self._n_steps,
            "steps_observed": len(self._steps),
            "calls": self.cal.n_calls,
            "calibrated_layers": calibrated,
            "sparsity": (sum(layer_sp[i] for i in calibrated) / len(calibrated)) if calibrated else 0.0,
            "rel_l1_worst_layer": max((layer_l1[i] for i in calibrated), default=0.0),
            "layer_sparsity": layer_sp,
            "layer_rel_l1": layer_l1,
            "dense_heads": int(prof.dense[prof.calibrated].sum()),
            "heads_calibrated": len(calibrated) * prof.heads,
            "skipped": dict(self._skipped),
            "seconds": round(self._seconds, 3),
            "summary": prof.summary(),
        }


def _save_atomically(tensors: dict, meta: dict, path: str) -> None:
    """safetensors (tensors + string metadata, never pickle); a half-written file never carries
    the profile's name."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
