"""Putting the Sparge Attention override on a model clone (`install`) and finding it again
(`find_override`): what the Sparge nodes do with a ComfyUI ModelPatcher."""
from __future__ import annotations

import logging
from typing import Optional

from .capture import MAP_AUTO
from .config import SpargeConfig
from .override import WRAPPER_KEY, SpargeOverride

log = logging.getLogger("sparge_attention")


def install(model_patcher, config: SpargeConfig, node_id=None, map_layer: Optional[int] = MAP_AUTO,
            observers: tuple = (), wrapper_key: str = WRAPPER_KEY) -> SpargeOverride:
    """Patch a ModelPatcher (already cloned by the caller) with a fresh SpargeOverride."""
    from comfy.patcher_extension import WrappersMP

    to = model_patcher.model_options.setdefault("transformer_options", {})
    prev = to.get("optimized_attention_override")
    ov = SpargeOverride(config, prev=prev, node_id=node_id, map_layer=map_layer, observers=observers)
    if prev is not None:
        log.info("Sparge Attention%s: another attention override was set before this node (%r); "
                 "calls that stay dense go through it.", ov.tag(), prev)
    to["optimized_attention_override"] = ov
    model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, wrapper_key, ov.apply_model_wrapper)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, wrapper_key, ov.outer_sample_wrapper)
    return ov


def find_override(model_patcher) -> Optional[SpargeOverride]:
    """The SpargeOverride installed on a ModelPatcher (also behind overrides chained after it)."""
    opts = getattr(model_patcher, "model_options", None) or {}
    ov = (opts.get("transformer_options") or {}).get("optimized_attention_override")
    seen = set()
    while ov is not None and id(ov) not in seen:
        if isinstance(ov, SpargeOverride):
            return ov
        seen.add(id(ov))
        ov = getattr(ov, "prev", None)
    wrappers = getattr(model_patcher, "wrappers", None) or {}
    for by_key in wrappers.values():  # an override hidden behind another node's plain function
        for fn in (by_key or {}).get(WRAPPER_KEY, []):
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, SpargeOverride):
                return owner
    return None
