"""Named settings for the node's preset combo, chosen by measurement.

Source: bench/realistic_bench.py on realistic video attention (Wan 2.1 480p shape, 3D RoPE,
local / temporal / global / sink heads), H100, 2026-11-26 (bench/results/*realistic*). Each
preset is the CDF threshold whose whole-output rel-L1 against fp32 dense attention (quantization
and skipping together) lands near its target: Quality ~0.02, Balanced ~0.04, Fast ~0.06,
Turbo ~0.09. All use "lse" scoring (the pooled query against every key: at equal error it
reached 0.70-0.76 sparsity where the paper's pooled-key scoring reached 0.45-0.50) with the
similarity rule off, which only matters for pooled-key scoring.
P.V skipping is off in every preset: on H100 the skip branch cost 12-26% of kernel time at
density 1.0 (bench/results/*gpu_check*) and it saved nothing measurable on realistic inputs.
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
    scoring: str
    source: str

    def params(self, **overrides) -> SpargeParams:
        kw = dict(simthreshd1=self.simthreshd1, pvthreshd=self.pvthreshd, scoring=self.scoring)
        if self.mode == "cdf":
            kw["cdfthreshd"] = self.cdfthreshd
        else:
            kw["topk"] = self.topk
        kw.update(overrides)
        return SpargeParams(**kw)


_SRC = "realistic benchmark, Wan 480p, H100 (README table)"
PRESETS = {
    p.name: p
    for p in (
        Preset("Quality", "cdf", -1.0, 0.97, 0.5, math.inf, "lse", _SRC),
        Preset("Balanced", "cdf", -1.0, 0.95, 0.5, math.inf, "lse", _SRC),
        Preset("Fast", "cdf", -1.0, 0.90, 0.3, math.inf, "lse", _SRC),
        Preset("Turbo", "cdf", -1.0, 0.85, 0.2, math.inf, "lse", _SRC),
    )
}
PRESET_NAMES = list(PRESETS) + ["Custom"]
