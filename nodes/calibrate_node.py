"""The "Sparge Calibrate" node: MODEL in, MODEL out. During the next sampling run of that model
it measures how sparse each block and head can be within a target error and writes a profile
(models/sparge_profiles/<profile_name>.safetensors); how is nodes/calibration.py."""
from __future__ import annotations

from comfy_api.latest import io

from ..sparge_core.presets import PRESETS
from .calibration import Calibration, CalibrationSettings
from .config import CALIBRATION_MODES, DEFAULT_MIN_TOKENS, DEFAULT_PRESET, SpargeConfig
from .install import find_override, install
from .override import SpargeOverride
from .profile_files import profile_name_error
from .schema import node_schema

CAL_WRAPPER_KEY = "sparge_calibrate"


def install_calibration(model_patcher, settings: CalibrationSettings, min_tokens: int = DEFAULT_MIN_TOKENS,
                        node_id=None) -> SpargeOverride:
    """Patch a ModelPatcher (already cloned by the caller) with an override that calibrates."""
    config = SpargeConfig(params=PRESETS[DEFAULT_PRESET].params(), preset="Calibrate", min_tokens=int(min_tokens),
                          hilbert=True)
    observer = Calibration(settings, min_tokens=int(min_tokens), node_id=node_id)
    return install(model_patcher, config, node_id=node_id, map_layer=None, observers=(observer,),
                   wrapper_key=CAL_WRAPPER_KEY)


TARGET_TIP = (
    "The error the profile may cost, as relative L1 of each attention output against exact (dense) "
    "attention: sum|sparse - dense| / sum|dense|, measured per block and head on your run (quantization "
    "included). Each head gets the most sparsity that stays within it on every observed step. "
    "0.05 is a safe default (about the Balanced preset); 0.02 = near lossless, less speed; 0.08-0.1 = faster, "
    "check the result. Heads that cannot gain at least 10% sparsity within the target stay dense.")


class SpargeCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "SpargeCalibrate", "Sparge Calibrate",
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
