"""The "Sparge Attention" node: MODEL in, MODEL out (a clone whose attention runs SpargeAttn)."""
from __future__ import annotations

from comfy_api.latest import io

from ..sparge_core.presets import PRESET_NAMES, PRESETS
from .capture import MAP_AUTO
from .config import (DEFAULT_MIN_TOKENS, DEFAULT_PRESET, ERROR_CHECK_MODES, MAX_TARGET, MODES, PV_OFF_AT,
                     DenseBlocksError, SpargeConfig, parse_dense_blocks)
from .install import install
from .profile_files import apply_profile
from .profile_node import SpargeProfileType
from .schema import node_schema

_BAL = PRESETS[DEFAULT_PRESET]

DESCRIPTION = (
    "Sparse + quantized attention (SpargeAttn) for video diffusion transformers such as Wan and "
    "HunyuanVideo. It predicts which blocks of the attention matrix matter, computes only those, and "
    "falls back to normal attention for calls it cannot speed up (text cross-attention, short sequences, "
    "blocks or steps you keep dense). At the end of every sampling run it logs a readout (sparsity, "
    "dense calls and why, estimated attention speed-up). For Wan 2.2 put one node after each model."
)

PRESET_TIP = (
    "Quality: keeps the most attention, safest. Balanced: a good default. Fast / Turbo: skip more "
    "attention for more speed, with a growing risk of visible changes. Custom: use the sliders below "
    "(any other preset ignores mode and the four threshold sliders). "
    + "Values (chosen by measured error on realistic video attention, see the README): "
    + "; ".join(f"{p.name} = {p.mode} {p.threshold}" for p in PRESETS.values())
    + "; skipped blocks estimated (fill_skipped), similarity rule and P.V skipping off in all."
)


class SpargeAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "SpargeAttention", "Sparge Attention",
            description=DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip="The video model (Wan, HunyuanVideo, ...) to speed up."),
                io.Combo.Input("preset", options=PRESET_NAMES, default=DEFAULT_PRESET, tooltip=PRESET_TIP),
                io.Combo.Input("mode", options=list(MODES), default=_BAL.mode, tooltip=(
                    "Custom only. share: keep every key block predicted to hold at least minshare times an even "
                    "share of a query block's attention (flat, global attention keeps everything; peaked attention "
                    "drops its tail; the best quality per speed we measured). cdf: per query block keep the fewest "
                    "key blocks that hold cdfthreshd of the predicted attention. topk: keep a fixed fraction (topk) "
                    "of key blocks (predictable speed).")),
                io.Float.Input("simthreshd1", default=_BAL.simthreshd1, min=-1.0, max=1.0, step=0.01, tooltip=(
                    "Custom only. How alike the tokens of a block must be before the block may be skipped. "
                    "Higher = fewer blocks qualify, so better quality and less speed-up; -1 lets every block be "
                    "skipped (most speed).")),
                io.Float.Input("cdfthreshd", default=_BAL.cdfthreshd, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Custom + cdf only. Share of the predicted attention to keep. Higher = better quality, less "
                    "speed-up; 1.0 keeps nearly everything.")),
                io.Float.Input("topk", default=_BAL.topk, min=0.01, max=1.0, step=0.01, tooltip=(
                    "Custom + topk only. Fraction of key blocks each query block keeps. Lower = faster but "
                    "rougher; 1.0 keeps every block.")),
                io.Float.Input("pvthreshd", default=PV_OFF_AT, min=1.0, max=PV_OFF_AT, step=1.0, tooltip=(
                    "Custom only. Skips the value product of blocks whose scores are this far below the best one "
                    "(log2 units). Lower = more skipping, more risk. 100 (the maximum) = off, the best choice with "
                    "the presets: on realistic video attention 8 or 15 skipped almost nothing and the call "
                    "ran ~10% slower (its check costs every block).")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Sparse attention starts at this fraction of the sampler's steps; earlier steps run normal "
                    "attention. The first steps shape the layout: raising this (e.g. 0.1-0.3) protects quality "
                    "and costs some speed.")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Sparse attention stops at this fraction of the sampler's steps; later steps run normal "
                    "attention. 1.0 = sparse until the end (fastest).")),
                io.String.Input("dense_blocks", default="", multiline=False, tooltip=(
                    "Transformer blocks that always use normal attention, e.g. '0, 1, 38-39' (empty = none). "
                    "Keeping the first and last blocks dense often protects quality at a small speed cost. "
                    "Blocks count from 0; HunyuanVideo numbers its double blocks first, then the single blocks.")),
                io.Boolean.Input("hilbert", default=True, tooltip=(
                    "Reorder video tokens along a 3D Hilbert curve so nearby pixels share a block. More blocks "
                    "can be skipped at the same quality. Text tokens are left in place. Leave on.")),
                io.Int.Input("min_tokens", default=DEFAULT_MIN_TOKENS, min=0, max=1 << 24, step=1, tooltip=(
                    "Attention calls shorter than this many tokens run normal attention (too short to gain). "
                    "Lower it only for small test videos.")),
                io.Boolean.Input("verbose", default=False, tooltip=(
                    "Log per-step details at the end of each run and, on CUDA, time the sparse attention "
                    "calls (adds a little overhead).")),
                io.Int.Input("map_layer", default=MAP_AUTO, min=-1, max=1023, step=1, optional=True, tooltip=(
                    "Which transformer block the Sparge Sparsity Map node shows: during sampling this node "
                    "keeps that block's kept/skipped block pattern of every step (a few MB at most). "
                    "-1 = the middle block. Blocks count from 0, like dense_blocks.")),
                io.Combo.Input("error_check", options=list(ERROR_CHECK_MODES), default="off", optional=True, tooltip=(
                    "Measure the error of the sparse attention on this run: some sparse calls also run normal "
                    "attention on the same inputs, and the readout (log line, sparge.readout event) gives the "
                    "relative L1 error and cosine similarity per block. sampled: every 4th step, a quarter of "
                    "the blocks (about +6% attention time). every call: all sparse calls (about 2x attention "
                    "time). The image is not changed.")),
                # after the older optional widgets: workflows saved before it keep their values
                io.Float.Input("minshare", default=_BAL.minshare, min=0.0, max=16.0, step=0.05, optional=True, tooltip=(
                    "Custom + share only. A key block is skipped when its predicted share of the attention is below "
                    "minshare x an even share. Higher = faster but rougher; 0 keeps every block.")),
                io.Boolean.Input("fill_skipped", default=_BAL.fill_skipped, optional=True, tooltip=(
                    "Estimate what the skipped blocks would have added (from their mean key and mean value) "
                    "instead of dropping it. On the realistic benchmark this cut the error about 3x at the same "
                    "sparsity for a few percent of attention time; the presets use it. A calibrated "
                    "profile's blocks follow the profile (Sparge Calibrate's own fill_skipped).")),
                io.Float.Input("target_rel_l1", default=0.0, min=0.0, max=MAX_TARGET, step=0.005, optional=True,
                               tooltip=(
                    "The error to hold, as relative L1 of the attention output against exact attention (0.04 = "
                    "outputs change by about 4% on average). The presets carry their own (Quality 0.02, Balanced "
                    "0.04, Fast 0.06, Turbo 0.09). During sampling the node measures the real error of each block "
                    "and head on a few sampled rows and moves that head's minshare toward it (share mode). "
                    "Custom: 0 = keep the thresholds exactly as set.")),
                SpargeProfileType.Input("profile", optional=True, tooltip=(
                    "Optional calibrated profile from the Load Sparge Profile node (made by Sparge Calibrate on "
                    "this model): its blocks use the measured per-head thresholds instead of the preset; blocks "
                    "it does not cover keep the preset.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model with Sparge attention; plug it into the sampler.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, preset=None, mode=None, dense_blocks=None, start_percent=None, end_percent=None,
                        error_check=None):
        # Naming an input here makes ComfyUI skip its own min/max check, so the range checks of
        # the two percents are repeated here; 0.3.75 does not check V3 combo values at all.
        if preset is not None and preset not in PRESET_NAMES:
            return f"preset '{preset}' not in {PRESET_NAMES}"
        if mode is not None and mode not in MODES:
            return f"mode '{mode}' not in {list(MODES)}"
        if error_check is not None and error_check not in ERROR_CHECK_MODES:
            return f"error_check '{error_check}' not in {list(ERROR_CHECK_MODES)}"
        if dense_blocks is not None:
            try:
                parse_dense_blocks(dense_blocks)
            except DenseBlocksError as e:
                return str(e)
        for name, val in (("start_percent", start_percent), ("end_percent", end_percent)):
            if val is not None and not (0.0 <= float(val) <= 1.0):
                return f"{name} must be between 0 and 1, got {val}"
        if start_percent is not None and end_percent is not None and float(start_percent) > float(end_percent):
            return (f"start_percent ({start_percent}) is after end_percent ({end_percent}): "
                    "no step would be sparse; swap them")
        return True

    @classmethod
    def execute(cls, model, preset, mode, simthreshd1, cdfthreshd, topk, pvthreshd, start_percent,
                end_percent, dense_blocks, hilbert, min_tokens, verbose, map_layer=MAP_AUTO, error_check="off",
                minshare=_BAL.minshare, fill_skipped=_BAL.fill_skipped, target_rel_l1=0.0,
                profile=None) -> io.NodeOutput:
        config = SpargeConfig.from_widgets(
            preset=preset, mode=mode, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
            pvthreshd=pvthreshd, start_percent=start_percent, end_percent=end_percent,
            dense_blocks=dense_blocks, hilbert=hilbert, min_tokens=min_tokens, verbose=verbose, minshare=minshare,
            fill_skipped=fill_skipped, target_rel_l1=target_rel_l1)
        node_id = getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
        config = apply_profile(config, model, profile, error_check)  # raises if it does not fit
        m = model.clone()
        install(m, config, node_id=node_id, map_layer=int(map_layer))
        return io.NodeOutput(m)
