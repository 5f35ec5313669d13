"""Named settings for the node's preset combo.

Each preset says where its numbers come from. Until the realistic benchmark has measured
better values (bench/NOTES.md), they are the reference implementation's published settings.
P.V skipping is off in every preset: on H100 the skip branch cost 19-26% of kernel time at
density 1.0 (bench/results/2026-11-26-H100-gpu_check-v2-*.log) and it saved nothing
measurable on realistic video attention (ANCHORS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .params import SpargeParams


@dataclass(frozen=True)
class Preset:
    name: str
    mode: str  # "cdf" or "topk"
    simthreshd1: float
    cdfthreshd: float
    topk: float
    pvthreshd: float
    source: str

    def params(self, **overrides) -> SpargeParams:
        kw = dict(simthreshd1=self.simthreshd1, pvthreshd=self.pvthreshd)
        if self.mode == "cdf":
            kw["cdfthreshd"] = self.cdfthreshd
        else:
            kw["topk"] = self.topk
        kw.update(overrides)
        return SpargeParams(**kw)


PRESETS = {
    p.name: p
    for p in (
        Preset("Quality", "cdf", 0.6, 0.98, 0.5, math.inf, "reference CDF API defaults (simthreshd1 0.6, cdfthreshd 0.98)"),
        Preset("Balanced", "cdf", 0.3, 0.96, 0.5, math.inf, "reference Triton example (0.3 / 0.96)"),
        Preset("Fast", "topk", -0.1, 0.96, 0.5, math.inf, "reference top-k API defaults (topk 0.5, similarity rule off)"),
        Preset("Turbo", "topk", -0.1, 0.96, 0.4, math.inf, "reference Wan 2.2 inference example (topk 0.4)"),
    )
}
PRESET_NAMES = list(PRESETS) + ["Custom"]
