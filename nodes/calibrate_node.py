"""The "Sparge Calibrate" node: MODEL in, MODEL out. During the next sampling run of that model
it measures, on the user's own prompt and resolution, how far each block and head can be
sparsified within a target error, and writes the result as a profile
(models/sparge_profiles/<profile_name>.safetensors) for the Load Sparge Profile node.

How: `CalibrateOverride` is a SpargeOverride (same eligibility rules, token-grid and Hilbert
learning, block counting, schedules of steps, readout) whose `_call_hook` hands each eligible
self-attention call to a `sparge_core.calibrate.Calibrator` (on every `every_n_steps`-th step,
once per block and cond/uncond batch) and then runs the call DENSE through ComfyUI's own
attention, so the run follows its normal trajectory and its output is the normal output.
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

import torch

from ..sparge_core.calibrate import Calibrator
from ..sparge_core.presets import PRESETS
from .config import CALIBRATION_MODES, DEFAULT_MIN_TOKENS, DEFAULT_PRESET, SpargeConfig
from .override import R_CALIBRATION, SpargeOverride, find_override
from .profiles_nodes import LoadedProfile, model_shape, profile_name_error, profile_path

log = logging.getLogger("sparge_attention")

CAL_WRAPPER_KEY = "sparge_calibrate"
SCORING = "lse"  # the presets' stage-1 scoring (sparge_core/presets.py)

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


class CalibrateOverride(SpargeOverride):
    """SpargeOverride that observes eligible self-attention calls and runs every call dense."""

    def __init__(self, config: SpargeConfig, settings: CalibrationSettings, prev=None, node_id=None):
        super().__init__(config, prev=prev, node_id=node_id, map_layer=None)
        self.settings = settings
        self.cal = None  # the Calibrator of the run in progress
        self.last_profile = None  # LoadedProfile written by the last finished run
        self._keys = set()  # (step, block, cond_or_uncond) observed in this run
        self._steps = set()
        self._skipped = {}
        self._seconds = 0.0
        self._pbar = None
        self._done = 0
        self._total = 1

    def __repr__(self):
        return f"CalibrateOverride(node={self.node_id}, profile={self.settings.profile_name!r})"

    # ------------------------------------------------------------------ per call
    def _call_hook(self, func, args, kwargs, ctx, layer, qh, kh, vh, grid, keep_keys, flops):
        if self.cal is not None and ctx is not None and layer is not None:
            # (under torch.compile the decorated _maybe_observe runs eagerly, behind a graph break)
            self._maybe_observe(ctx, layer, qh, kh, vh, grid, keep_keys, kwargs.get("transformer_options"))
        return self._dense(func, args, kwargs, ctx, R_CALIBRATION, flops)

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
        if detail and (reason, "warned") not in self._skipped:
            self._skipped[(reason, "warned")] = True
            log.warning("Sparge Calibrate%s: a call was not calibrated: %s", self._node_tag(), detail)

    # ------------------------------------------------------------------ per run
    def outer_sample_wrapper(self, executor, *args, **kwargs):
        s = self.settings
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        n_steps = max(0, int(sigmas.shape[-1]) - 1) if isinstance(sigmas, torch.Tensor) else 0
        guider = getattr(executor, "class_obj", None)
        shape = model_shape(getattr(guider, "model_patcher", None))
        self.cal = Calibrator(s.target_l1, mode=s.mode, scoring=SCORING, sample_query_blocks=s.sample_query_blocks,
                              fill=s.fill_skipped)
        self._keys, self._steps, self._skipped = set(), set(), {}
        self._seconds, self._done = 0.0, 0
        steps_to_observe = len(range(0, n_steps, s.every_n_steps)) if n_steps else 1
        self._total = max(1, steps_to_observe * (shape["blocks"] or 1))
        self._pbar = _progress_bar(self._total, self.node_id)
        failed = []

        def sample_then_write(*a, **kw):
            run = self.run  # the RunStats the base wrapper made for this run
            try:
                out = executor(*a, **kw)
            except BaseException:
                run.calibration = {"error": "the sampling run did not finish: no profile written", "file": None}
                raise
            try:
                run.calibration = self._write_profile(run, shape, n_steps)
            except Exception as e:
                failed.append(e)
                run.calibration = {"error": str(e), "file": None}
                log.error("Sparge Calibrate%s: %s", self._node_tag(), e)
            return out

        try:
            out = super().outer_sample_wrapper(sample_then_write, *args, **kwargs)
        finally:
            self.cal, self._pbar = None, None
            _finish_progress(self.node_id)
        if failed:
            raise CalibrationFailed(f"Sparge Calibrate: {failed[0]}") from failed[0]
        return out

    def _write_profile(self, run, shape, n_steps) -> dict:
        from safetensors.torch import save_file

        s, cal = self.settings, self.cal
        if cal.n_calls == 0:
            dense = {}
            for st in run.steps.values():
                for r, n in st.dense.items():
                    dense[r] = dense.get(r, 0) + n
            dense.pop(R_CALIBRATION, None)
            why = ", ".join(f"{r} {n}" for r, n in sorted(dense.items())) or "none"
            skipped = ", ".join(f"{r} {n}" for r, n in sorted(self._skipped.items()) if isinstance(r, str))
            raise ValueError(
                "no self-attention call could be calibrated, so no profile was written (calls not eligible: "
                f"{why}{'; skipped: ' + skipped if skipped else ''}). Calls shorter than min_tokens="
                f"{self.config.min_tokens} are never sparse: lower min_tokens for small test videos.")
        observed_max = max(cal.calls)
        n_layers = shape["blocks"] if shape["blocks"] and shape["blocks"] > observed_max else observed_max + 1
        prof = cal.result(model_family=shape["family"] or "unknown", n_layers=n_layers, steps=len(self._steps))
        prof.validate()
        path = profile_path(s.profile_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        layer_sp = [round(float(x), 6) for x in prof.sparsity.tolist()]
        layer_l1 = [round(float(x), 6) for x in prof.rel_l1.tolist()]
        meta = dict(prof.metadata())
        meta.update({
            "layer_sparsity": json.dumps(layer_sp), "layer_rel_l1": json.dumps(layer_l1),
            "every_n_steps": str(s.every_n_steps), "steps_run": str(n_steps),
            "created_by": "Sparge Calibrate node (ComfyUI)",
        })
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            save_file(prof.tensors(), tmp, metadata=meta)
            os.replace(tmp, path)  # a half-written file never carries the profile's name
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        name = os.path.basename(path)
        self.last_profile = LoadedProfile(prof, name, path)
        calibrated = [i for i, c in enumerate(prof.calibrated.tolist()) if c]
        n_dense = int(prof.dense[prof.calibrated].sum())
        summary = {
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
            "steps_run": n_steps,
            "steps_observed": len(self._steps),
            "calls": cal.n_calls,
            "calibrated_layers": calibrated,
            "sparsity": (sum(layer_sp[i] for i in calibrated) / len(calibrated)) if calibrated else 0.0,
            "rel_l1_worst_layer": max((layer_l1[i] for i in calibrated), default=0.0),
            "layer_sparsity": layer_sp,
            "layer_rel_l1": layer_l1,
            "dense_heads": n_dense,
            "heads_calibrated": len(calibrated) * prof.heads,
            "skipped": {r: n for r, n in self._skipped.items() if isinstance(r, str)},
            "seconds": round(self._seconds, 3),
            "summary": prof.summary(),
        }
        log.info("Sparge Calibrate%s: wrote %s: %s; calibration took %.1f s over %d calls (%d of %d steps)",
                 self._node_tag(), path, prof.summary(), self._seconds, cal.n_calls, len(self._steps), n_steps)
        return summary


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


def install_calibration(model_patcher, settings: CalibrationSettings, min_tokens: int = DEFAULT_MIN_TOKENS,
                        node_id=None) -> CalibrateOverride:
    """Patch a ModelPatcher (already cloned by the caller) with a CalibrateOverride."""
    from comfy.patcher_extension import WrappersMP

    config = SpargeConfig(params=PRESETS[DEFAULT_PRESET].params(), preset="Calibrate", min_tokens=int(min_tokens),
                          hilbert=True)
    to = model_patcher.model_options.setdefault("transformer_options", {})
    prev = to.get("optimized_attention_override")
    ov = CalibrateOverride(config, settings, prev=prev, node_id=node_id)
    to["optimized_attention_override"] = ov
    model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, CAL_WRAPPER_KEY, ov.apply_model_wrapper)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, CAL_WRAPPER_KEY, ov.outer_sample_wrapper)
    return ov


# ----------------------------------------------------------------------------- the node
TARGET_TIP = (
    "The error the profile may cost, as relative L1 of each attention output against exact (dense) "
    "attention: sum|sparse - dense| / sum|dense|, measured per block and head on your run (quantization "
    "included). Each head gets the most sparsity that stays within it on every observed step. "
    "0.05 is a safe default (about the Balanced preset); 0.02 = near lossless, less speed; 0.08-0.1 = faster, "
    "check the result. Heads that cannot gain at least 10% sparsity within the target stay dense.")


def _node_class():
    from comfy_api.latest import io

    class SpargeCalibrate(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="SpargeCalibrate",
                display_name="Sparge Calibrate",
                category="model_patches/attention",
                description=(
                    "Measures how sparse each block and head of YOUR model can be within a target error and "
                    "saves it as a profile (models/sparge_profiles/<profile_name>.safetensors). Put it where the "
                    "Sparge Attention node would go (before the sampler) and run your workflow once: the run "
                    "itself uses normal attention, so its output is unchanged; the calibration costs about one "
                    "more sampling run and shows on this node's progress bar. Then load the profile with "
                    "Load Sparge Profile into Sparge Attention's 'profile' input. Calibrate at the resolution "
                    "and length you render at."),
                inputs=[
                    io.Model.Input("model", tooltip="The video model to calibrate (without Sparge Attention)."),
                    io.String.Input("profile_name", default="my_video_model", multiline=False, tooltip=(
                        "File name of the profile in models/sparge_profiles (.safetensors is added). An existing "
                        "file of that name is replaced at the end of the run.")),
                    io.Float.Input("target_l1", default=0.05, min=0.005, max=0.5, step=0.005,
                                   display_mode=io.NumberDisplay.slider, tooltip=TARGET_TIP),
                    io.Combo.Input("mode", options=list(CALIBRATION_MODES), default="cdf", tooltip=(
                        "What the profile sets per head. cdf: the share of predicted attention to keep (adapts "
                        "to each query; carries over to other resolutions best). topk: a fixed fraction of key "
                        "blocks (predictable speed).")),
                    io.Int.Input("every_n_steps", default=4, min=1, max=1000, step=1, tooltip=(
                        "Observe every Nth sampling step (0, N, 2N, ...). 1 observes every step: most thorough, "
                        "about 3-4x the run's attention time. 4 (default) keeps the whole calibration within "
                        "about two sampling runs.")),
                    io.Int.Input("sample_query_blocks", default=16, min=2, max=4096, step=1, tooltip=(
                        "Query blocks (of 64 tokens) measured per observed call, spread over the video. Each "
                        "call draws a new sample, so many steps see many blocks. More = a tighter estimate, "
                        "slower (16 cost 3.2x one dense attention call at Wan 480p on an H100, 8 cost 2x).")),
                    io.Int.Input("min_tokens", default=DEFAULT_MIN_TOKENS, min=0, max=1 << 24, step=1, tooltip=(
                        "Like Sparge Attention's min_tokens: calls shorter than this are never sparse, so they "
                        "are not calibrated. Use the same value as on your Sparge Attention node.")),
                    # optional and last: workflows saved before it keep their widget values
                    io.Boolean.Input("fill_skipped", default=True, optional=True, tooltip=(
                        "Measure with the skipped blocks estimated (their mean key and value) instead of "
                        "dropped, as the presets run; the profile then runs that way too. About 3x lower error "
                        "at the same sparsity on the realistic benchmark, so the same target allows far more "
                        "skipping.")),
                ],
                outputs=[io.Model.Output(tooltip=(
                    "The model with calibration hooks; plug it into the sampler. Its output is the normal, "
                    "dense-attention result."))],
                hidden=[io.Hidden.unique_id],
            )

        @classmethod
        def validate_inputs(cls, profile_name=None, mode=None):
            # (inputs named here skip ComfyUI's own checks: only these two, whose checks are ours;
            # 0.3.75 does not check V3 combo values)
            if profile_name is not None:
                err = profile_name_error(profile_name)
                if err:
                    return err
            if mode is not None and mode not in CALIBRATION_MODES:
                return f"mode '{mode}' not in {list(CALIBRATION_MODES)}"
            return True

        @classmethod
        def execute(cls, model, profile_name, target_l1, mode, every_n_steps, sample_query_blocks,
                    min_tokens, fill_skipped=True) -> io.NodeOutput:
            if find_override(model) is not None:
                raise ValueError("Sparge Calibrate needs the model WITHOUT Sparge Attention: connect it where the "
                                 "Sparge Attention node would go (calibration measures against normal attention)")
            settings = CalibrationSettings(profile_name=str(profile_name), target_l1=float(target_l1), mode=str(mode),
                                           every_n_steps=int(every_n_steps),
                                           sample_query_blocks=int(sample_query_blocks),
                                           fill_skipped=bool(fill_skipped))
            node_id = getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
            m = model.clone()
            install_calibration(m, settings, min_tokens=int(min_tokens), node_id=node_id)
            return io.NodeOutput(m)

    return SpargeCalibrate


_CLASS = {}


def node_class():
    if "node" not in _CLASS:
        _CLASS["node"] = _node_class()
    return _CLASS["node"]


__all__ = ["CalibrateOverride", "CalibrationSettings", "CalibrationFailed", "install_calibration", "node_class"]
