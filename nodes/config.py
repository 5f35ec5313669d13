"""The node's widgets turned into one frozen settings object (no ComfyUI imports here)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from ..sparge_core.params import SpargeParams
from ..sparge_core.presets import PRESET_NAMES, PRESETS

MODES = ("cdf", "topk")
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

    @classmethod
    def from_widgets(cls, preset: str = DEFAULT_PRESET, mode: str = "cdf", simthreshd1: float = -1.0,
                     cdfthreshd: float = 0.95, topk: float = 0.5, pvthreshd: float = PV_OFF_AT,
                     start_percent: float = 0.0, end_percent: float = 1.0, dense_blocks: str = "",
                     hilbert: bool = True, min_tokens: int = DEFAULT_MIN_TOKENS, verbose: bool = False) -> "SpargeConfig":
        if preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
        if preset == "Custom":
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            kw = dict(simthreshd1=float(simthreshd1), pvthreshd=pv_widget_to_threshold(pvthreshd),
                      scoring=CUSTOM_SCORING)
            if mode == "cdf":
                kw["cdfthreshd"] = float(cdfthreshd)
            else:
                kw["topk"] = float(topk)
            params = SpargeParams(**kw)
        else:
            params = PRESETS[preset].params()
        return cls(params=params, preset=preset, start_percent=float(start_percent), end_percent=float(end_percent),
                   dense_blocks=parse_dense_blocks(dense_blocks), hilbert=bool(hilbert),
                   min_tokens=int(min_tokens), verbose=bool(verbose))

    def threshold(self) -> float:
        return float(self.params.cdfthreshd if self.params.mode == "cdf" else self.params.topk)

    def in_schedule(self, percent: Optional[float]) -> bool:
        """Sparse at this point of sampling? percent = step index / number of steps (None: unknown -> yes)."""
        if percent is None:
            return True
        return self.start_percent <= percent + 1e-9 and percent + 1e-9 < self.end_percent

    def describe(self) -> dict:
        p = self.params
        pv = float(p.pvthreshd)
        return {
            "preset": self.preset,
            "mode": p.mode,
            "simthreshd1": float(p.simthreshd1),
            "cdfthreshd": None if p.cdfthreshd is None else float(p.cdfthreshd),
            "topk": None if p.topk is None else float(p.topk),
            "pvthreshd": None if math.isinf(pv) else pv,  # None = P.V skipping off
            "scoring": p.scoring,
            "start_percent": self.start_percent,
            "end_percent": self.end_percent,
            "dense_blocks": sorted(self.dense_blocks),
            "hilbert": self.hilbert,
            "min_tokens": self.min_tokens,
            "verbose": self.verbose,
        }
