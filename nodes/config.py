"""The node's widgets turned into one frozen settings object (no ComfyUI imports here)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..sparge_core.params import MODES, THRESHOLD_FIELD, SpargeParams
from ..sparge_core.presets import PRESET_NAMES, PRESETS

# error_check widget (nodes/error_check.py): "off", "sampled" (every 4th step, a rotating quarter of
# the blocks: ~1/16 of the sparse calls), "every call" (each sparse call also runs dense: ~2x attention time)
ERROR_CHECK_MODES = ("off", "sampled", "every call")
CALIBRATION_MODES = ("cdf", "topk")  # the thresholds sparge_core.calibrate searches per head
MAX_TARGET = 0.5  # target_rel_l1 widget: the largest error a user may ask for
PV_OFF_AT = 100.0  # a pvthreshd widget value >= this means "never skip P.V" (inf)
DEFAULT_PRESET = "Balanced"
DEFAULT_MIN_TOKENS = 2048
# Stage-1 scoring of the Custom preset: the same as the measured presets (sparge_core/presets.py).
CUSTOM_SCORING = "lse"

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_NUMBER = re.compile(r"^\d+$")


class DenseBlocksError(ValueError):
    pass


def parse_dense_blocks(text: Optional[str]) -> frozenset[int]:
    """ "0, 1, 38-39" -> {0, 1, 38, 39}. Empty -> no block. Raises DenseBlocksError with a
    message meant for the user on anything else ("3-", "a", "5-2", "-1")."""
    if text is None:
        return frozenset()
    text = str(text).strip()
    if not text:
        return frozenset()
    out: set[int] = set()
    for raw in text.replace(";", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        if _NUMBER.match(item):
            out.add(int(item))
            continue
        m = _RANGE.match(item)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise DenseBlocksError(f"dense_blocks: the range '{item}' goes backwards; write {b}-{a}")
            if b - a > 100000:
                raise DenseBlocksError(f"dense_blocks: the range '{item}' is too long")
            out.update(range(a, b + 1))
            continue
        raise DenseBlocksError(
            f"dense_blocks: '{item}' is not a block number or a range. "
            "Use non-negative block numbers and ranges separated by commas, e.g. '0, 1, 38-39' (empty = none)")
    return frozenset(out)


def format_dense_blocks(blocks) -> str:
    """{0, 1, 38, 39} -> "0-1, 38-39" (for logs)."""
    b = sorted(blocks)
    parts, i = [], 0
    while i < len(b):
        j = i
        while j + 1 < len(b) and b[j + 1] == b[j] + 1:
            j += 1
        parts.append(str(b[i]) if i == j else f"{b[i]}-{b[j]}")
        i = j + 1
    return ", ".join(parts)


def _as_json_number(x):
    """A threshold (float, or per-head tensor / tuple) as JSON: a float when every head agrees,
    else a list of floats (no float() on a multi-element tensor)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        vals = [float(v) for v in x.detach().flatten().cpu().tolist()]
    elif isinstance(x, (tuple, list)):
        vals = [float(v) for v in x]
    else:
        return float(x)
    if vals and all(v == vals[0] for v in vals):
        return vals[0]
    return vals


def pv_widget_to_threshold(value: float) -> float:
    value = float(value)
    return math.inf if value >= PV_OFF_AT else value


@dataclass(frozen=True)
class SpargeConfig:
    """Everything the attention override needs to decide and run a call."""

    params: SpargeParams
    preset: str = DEFAULT_PRESET
    start_percent: float = 0.0
    end_percent: float = 1.0
    dense_blocks: frozenset = field(default_factory=frozenset)
    hilbert: bool = True
    min_tokens: int = DEFAULT_MIN_TOKENS
    verbose: bool = False
    # A calibrated profile (nodes/profiles_nodes.py LoadedProfile): its calibrated layers use the
    # profile's per-head params, every other layer the preset above. None: the preset everywhere.
    profile: Any = field(default=None, compare=False, hash=False, repr=False)
    error_check: str = "off"  # one of ERROR_CHECK_MODES (nodes/error_check.py)
    # What fitting the profile to the model noted (e.g. another model family), for the readout.
    profile_notes: tuple = field(default=(), compare=False)
    # The error to hold (rel-L1 of the attention output): a preset's own target, Custom's slider;
    # 0 = the thresholds stay as set (nodes/adapt.py moves them toward it, share mode only).
    target_rel_l1: float = 0.0

    @classmethod
    def from_widgets(cls, preset: str = DEFAULT_PRESET, mode: str = "cdf", simthreshd1: float = -1.0,
                     cdfthreshd: float = 0.95, topk: float = 0.5, pvthreshd: float = PV_OFF_AT,
                     start_percent: float = 0.0, end_percent: float = 1.0, dense_blocks: str = "",
                     hilbert: bool = True, min_tokens: int = DEFAULT_MIN_TOKENS, verbose: bool = False,
                     minshare: float = PRESETS[DEFAULT_PRESET].minshare,
                     fill_skipped: bool = PRESETS[DEFAULT_PRESET].fill_skipped,
                     target_rel_l1: float = 0.0) -> "SpargeConfig":
        if preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
        target = float(target_rel_l1 or 0.0)
        if not (0.0 <= target <= MAX_TARGET):
            raise ValueError(f"target_rel_l1 must be between 0 (off) and {MAX_TARGET}, got {target_rel_l1}")
        if preset == "Custom":
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            widgets = {"cdfthreshd": cdfthreshd, "topk": topk, "minshare": minshare}
            params = SpargeParams.for_mode(mode, float(widgets[THRESHOLD_FIELD[mode]]), simthreshd1=float(simthreshd1),
                                           pvthreshd=pv_widget_to_threshold(pvthreshd), scoring=CUSTOM_SCORING,
                                           fill_skipped=bool(fill_skipped))
        else:
            params = PRESETS[preset].params()
            target = PRESETS[preset].target_rel_l1
        return cls(params=params, preset=preset, start_percent=float(start_percent), end_percent=float(end_percent),
                   dense_blocks=parse_dense_blocks(dense_blocks), hilbert=bool(hilbert),
                   min_tokens=int(min_tokens), verbose=bool(verbose), target_rel_l1=target)

    def threshold(self):
        """The preset's cdfthreshd / topk / minshare: a float, or a list when it holds per-head values."""
        return _as_json_number(self.params.threshold)

    def params_for_layer(self, layer: Optional[int]) -> SpargeParams:
        """The params of one transformer block: the profile's per-head params where the profile
        calibrated that block, else the preset's."""
        prof = self.profile
        if prof is None or layer is None:
            return self.params
        return prof.params_for_layer(layer, self.params)

    def layer_all_dense(self, layer: Optional[int]) -> bool:
        """True when the profile keeps every head of this block dense (run it as normal attention)."""
        prof = self.profile
        if prof is None or layer is None:
            return False
        return prof.all_dense(layer)

    def in_schedule(self, percent: Optional[float]) -> bool:
        """Sparse at this point of sampling? percent = step index / number of steps (None: unknown -> yes)."""
        if percent is None:
            return True
        return self.start_percent <= percent + 1e-9 and percent + 1e-9 < self.end_percent

    def describe(self) -> dict:
        p = self.params
        pv = _as_json_number(p.pvthreshd)
        if isinstance(pv, float) and math.isinf(pv):
            pv = None  # P.V skipping off
        elif isinstance(pv, list):
            pv = [None if math.isinf(x) else x for x in pv]
        return {
            "preset": self.preset,
            "mode": p.mode,
            "simthreshd1": _as_json_number(p.simthreshd1),
            "cdfthreshd": _as_json_number(p.cdfthreshd),
            "topk": _as_json_number(p.topk),
            "minshare": _as_json_number(p.minshare),
            "pvthreshd": pv,  # None = P.V skipping off
            "scoring": p.scoring,
            "fill_skipped": p.fill_skipped,
            "target_rel_l1": self.target_rel_l1 or None,  # None: thresholds as set
            "start_percent": self.start_percent,
            "end_percent": self.end_percent,
            "dense_blocks": sorted(self.dense_blocks),
            "hilbert": self.hilbert,
            "min_tokens": self.min_tokens,
            "verbose": self.verbose,
            "error_check": self.error_check,
            "profile": None if self.profile is None else getattr(self.profile, "name", "?"),
        }


SLIDER_WIDGETS = ("mode", "simthreshd1", "cdfthreshd", "topk", "pvthreshd", "minshare", "fill_skipped", "target_rel_l1")


def presets_for_ui() -> dict:
    """The preset table as the node's widgets show it (GET /sparge/presets, read by web/sparge.js,
    so the browser never keeps its own copy of these numbers)."""
    table = {}
    for p in PRESETS.values():
        pv = float(p.pvthreshd)
        table[p.name] = {"mode": p.mode, "simthreshd1": float(p.simthreshd1), "cdfthreshd": float(p.cdfthreshd),
                         "topk": float(p.topk), "minshare": float(p.minshare), "fill_skipped": bool(p.fill_skipped),
                         "target_rel_l1": float(p.target_rel_l1),
                         "pvthreshd": PV_OFF_AT if pv >= PV_OFF_AT else pv}
    return {"names": list(PRESET_NAMES), "custom": "Custom", "default": DEFAULT_PRESET,
            "slider_widgets": list(SLIDER_WIDGETS), "presets": table}
