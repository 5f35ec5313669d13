"""Named settings for the node's preset combo, chosen by measurement.

Source: bench/realistic_bench.py on realistic video attention (Wan 2.1 480p and HunyuanVideo
544p shapes, 3D RoPE, local / temporal / global / sink heads), first H100 2026-11-27
(bench/results/2026-11-27-H100-realistic-v18.log); the minshares moved up on 2026-12-06 with the
estimate's second-order term, which lowered the error at every threshold (2026-12-06-H100-v43.log:
rel-L1 0.023 / 0.046 / 0.066 / 0.097 at Wan, 0.021 / 0.039 / 0.053 / 0.076 at HunyuanVideo). Each
preset is the share-mode threshold whose whole-output rel-L1 against fp32 dense attention
(quantization and skipping together) lands near its target, averaged over both shapes: Quality
~0.02, Balanced ~0.04, Fast ~0.06, Turbo ~0.09. Those targets
are the presets' `target_rel_l1`: during sampling the node measures the error per block and head
and moves each head's minshare toward it (sparge_core/adapt.py); minshare is where it starts.

All presets estimate the skipped blocks (fill_skipped: each skipped key block joins the softmax as
its mean key and mean value, calibrated by the lse scores) instead of dropping them: that cut the
error ~3x at equal sparsity (then 20-30% more with the second-order term), so at rel-L1 0.05 the
whole call runs at 0.095x cuDNN (Wan, sparsity 0.95) and 0.063x (HunyuanVideo, 0.97; H100,
2026-12-06-H100-v44.log), where dropping needed 0.254x / 0.259x (2026-11-27). Share mode (one
probability floor, minshare x an even share, for every row) reached a given error with fewer
blocks than CDF or top-k (without the estimate: 0.253x vs 0.280x / 0.273x at Wan). "lse" scoring
(the pooled query against every key) with the similarity rule off, which only matters for
pooled-key scoring. The cdfthreshd / topk values are what the node's sliders show for the other
modes. P.V skipping is off: on H100 the skip branch cost 12-26% of kernel time at density 1.0
(bench/results/*gpu_check*) and it saved nothing measurable on realistic inputs.
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
    fill_skipped: bool
    target_rel_l1: float  # the error the preset holds: rel-L1 of the attention output (sparge_core/adapt.py)
    source: str

    @property
    def threshold(self) -> float:
        return getattr(self, THRESHOLD_FIELD[self.mode])

    def params(self, **overrides) -> SpargeParams:
        kw = dict(simthreshd1=self.simthreshd1, pvthreshd=self.pvthreshd, scoring=self.scoring,
                  fill_skipped=self.fill_skipped)
        kw[THRESHOLD_FIELD[self.mode]] = self.threshold
        kw.update(overrides)
        return SpargeParams(**kw)


_SRC = "realistic benchmark, Wan 480p and HunyuanVideo 544p (README table)"
PRESETS = {
    p.name: p
    for p in (
        Preset("Quality", "share", -1.0, 0.97, 0.5, 0.8, math.inf, "lse", True, 0.02, _SRC),
        Preset("Balanced", "share", -1.0, 0.95, 0.5, 2.5, math.inf, "lse", True, 0.04, _SRC),
        Preset("Fast", "share", -1.0, 0.90, 0.3, 5.0, math.inf, "lse", True, 0.06, _SRC),
        Preset("Turbo", "share", -1.0, 0.85, 0.2, 12.0, math.inf, "lse", True, 0.09, _SRC),
    )
}
PRESET_NAMES = list(PRESETS) + ["Custom"]
