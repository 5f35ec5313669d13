"""From a captured sparsity map (SpargeOverride.last_map, nodes/capture.py) to the Sparge Sparsity
Map node's two pictures, or a message card saying why there is nothing to show (no ComfyUI imports)."""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from ..sparge_core.blockmask import unpack_mask
from .sparsity_render import render_block_mask, render_layer_step, render_message


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def block_mask_image(data: Optional[dict], step: int = -1, head: int = -1) -> tuple[Image.Image, dict]:
    """The block-mask view of a capture (SpargeOverride.last_map). Returns (image, info); info has
    "ok" False (and the image is a message card) when there is nothing to show."""
    if not data:
        return render_message("No sparsity map yet", [
            "The Sparge Attention node has not finished a sampling run with this model yet.",
            "Connect this node's 'samples' input to the sampler's output and queue the graph."]), {"ok": False}
    masks = data.get("masks") or {}
    layer = data.get("map_layer")
    if not masks:
        why = data.get("map_dense") or {}
        n_layers = data.get("n_layers")
        lines = []
        if layer is not None and n_layers is not None and layer >= n_layers:
            lines.append(f"map_layer {layer} is not in this model: it has blocks 0-{n_layers - 1}. "
                         "Set map_layer on the Sparge Attention node (-1 = the middle block).")
        elif why:
            lines.append(f"Block {layer} ran normal attention in every step: "
                         + ", ".join(f"{k} ({v} calls)" for k, v in sorted(why.items())) + ".")
            lines.append("Pick another block with map_layer on the Sparge Attention node, or check its "
                         "dense_blocks, start/end_percent and min_tokens.")
        else:
            lines.append(f"Block {layer} made no sparse attention call in the last run.")
        return render_message("No block mask captured", lines), {"ok": False}
    keys = sorted(masks)
    if step is None or step < 0:
        key = keys[-1]
    elif step in masks:
        key = step
    else:
        shown = ", ".join(str(k) for k in keys[:12]) + (" ..." if len(keys) > 12 else "")
        return render_message(f"Step {step} was not captured", [
            f"Captured steps of block {layer}: {shown}. Use -1 for the last one."]), {"ok": False}
    entry = masks[key]
    m = unpack_mask(entry["packed"], entry["nk"]).numpy()  # (H, NQ, NK) bool
    heads = m.shape[0]
    if head is not None and head >= heads:
        return render_message(f"Head {head} does not exist", [
            f"This model has {heads} heads (0-{heads - 1}); -1 shows the mean over heads."]), {"ok": False}
    if head is None or head < 0:
        values, mean, who = m.mean(0), True, f"mean of {heads} heads"
    else:
        values, mean, who = m[head].astype(np.float64), False, f"head {head} of {heads}"
    kept = float(m.mean()) if mean else float(values.mean())
    n_steps = data.get("n_steps")
    step_txt = "step ?" if key < 0 else f"step {key}" + (f" (steps 0-{n_steps - 1})" if n_steps else "")
    sigma = entry.get("sigma")
    title = f"Sparge block mask \u00b7 block {layer} \u00b7 {step_txt}"
    order = "Hilbert order" if data.get("hilbert") else "token order"
    bq, bk = data.get("block_q") or 64, data.get("block_k") or 128
    sub = (f"{who} \u00b7 {_pct(1 - kept)} of blocks skipped \u00b7 {values.shape[0]}x{values.shape[1]} blocks of "
           f"{bq}x{bk} tokens, {order}" + (f" \u00b7 sigma {sigma:.3g}" if isinstance(sigma, (int, float)) else ""))
    img = render_block_mask(values, title=title, subtitle=sub, mean=mean, block_q=bq, block_k=bk)
    return img, {"ok": True, "step": key, "head": None if mean else head, "heads": heads, "layer": layer,
                 "shape": tuple(values.shape), "kept_fraction": kept, "values": values}


def layer_step_image(data: Optional[dict]) -> tuple[Image.Image, dict]:
    if not data:
        return render_message("No layer x step map yet", [
            "The Sparge Attention node has not finished a sampling run with this model yet."]), {"ok": False}
    rows = data.get("layer_step_sparsity") or []
    if not rows or not any(len(r) for r in rows):
        return render_message("No transformer block ran", [
            "The last run made no self-attention call that the Sparge Attention node saw."]), {"ok": False}
    steps = data.get("steps") or list(range(len(rows)))
    title = "Sparge sparsity \u00b7 block x step"
    sub = (f"{data.get('preset', '')} \u00b7 overall {_pct(data.get('sparsity'))} of blocks skipped \u00b7 "
           f"{len(rows)} steps, {max(len(r) for r in rows)} blocks")
    if data.get("dropped_steps"):
        sub += f" \u00b7 block masks of {data['dropped_steps']} steps not kept (memory cap)"
    img = render_layer_step(rows, steps, title=title, subtitle=sub, highlight_layer=data.get("map_layer")
                            if data.get("masks") else None)
    return img, {"ok": True, "rows": len(rows)}
