"""Named settings for the node's preset combo, chosen by measurement.

Source: bench/realistic_bench.py on realistic video attention (Wan 2.1 480p and HunyuanVideo
544p shapes, 3D RoPE, local / temporal / global / sink heads), 2026-11-26 (bench/results/
*realistic*). Each preset is the share-mode threshold whose whole-output rel-L1 against fp32
dense attention (quantization and skipping together) lands near its target on both shapes:
Quality ~0.02, Balanced ~0.04, Fast ~0.06, Turbo ~0.09. Share mode (one probability floor,
minshare x an even share, for every row) reached a given error at 0.71-0.74 sparsity where CDF
and top-k reached 0.69-0.71 (rel-L1 0.05 on H100: 0.253x vs 0.280x cuDNN at Wan, 0.257x vs
0.283x at HunyuanVideo; bench/results/2026-11-27-H100-realistic-share.log). All use "lse"
scoring (the pooled query against every key: at equal error it reached 0.70-0.76 sparsity where
the paper's pooled-key scoring reached 0.45-0.50) with the similarity rule off, which only
matters for pooled-key scoring. The cdfthreshd / topk values are what the node's sliders show
for the other modes (the CDF presets of before share mode, same errors).
P.V skipping is off in every preset: on H100 the skip branch cost 12-26% of kernel time at
density 1.0 (bench/results/*gpu_check*) and it saved nothing measurable on realistic inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .params import THRESHOLD_FIELD, SpargeParams


@dataclass(frozen=True)
class Preset:
    name: str
    mode: str  # "cdf", "topk" or "share"
    simthreshd1: float
    cdfthreshd: float  # every preset carries a value for each mode's slider (the node shows all three);
    topk: float        # only the one of its mode is used
    minshare: float
    pvthreshd: float
    scoring: str
    source: str

    @property
    def threshold(self) -> float:
        return getattr(self, THRESHOLD_FIELD[self.mode])

    def params(self, **overrides) -> SpargeParams:
        kw = dict(simthreshd1=self.simthreshd1, pvthreshd=self.pvthreshd, scoring=self.scoring)
        kw[THRESHOLD_FIELD[self.mode]] = self.threshold
        kw.update(overrides)
        return SpargeParams(**kw)


_SRC = "realistic benchmark, Wan 480p and HunyuanVideo 544p (README table)"
PRESETS = {
    p.name: p
    for p in (
        Preset("Quality", "share", -1.0, 0.97, 0.5, 0.15, math.inf, "lse", _SRC),
        Preset("Balanced", "share", -1.0, 0.95, 0.5, 0.3, math.inf, "lse", _SRC),
        Preset("Fast", "share", -1.0, 0.90, 0.3, 0.55, math.inf, "lse", _SRC),
        Preset("Turbo", "share", -1.0, 0.85, 0.2, 0.9, math.inf, "lse", _SRC),
    )
}
PRESET_NAMES = list(PRESETS) + ["Custom"]
