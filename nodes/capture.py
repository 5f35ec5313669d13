"""Sparsity-map capture for the "Sparge Sparsity Map" node (nodes/sparsity_map.py).

In every forward, the sparse call of ONE transformer block (the node's `map_layer`; -1 = the
middle block) also returns the predicted block mask of its first batch item, bit-packed on the
device (sparge_core.blockmask.pack_mask; in a sampling run written by the call's CUDA graph, under
torch.compile the "sparge::attention_map" op's), kept per step (the first forward of a step wins),
up to MAP_MAX_BYTES per run. Nothing is read from the device during sampling: `finish_map` copies
the masks to the CPU once, at the end of the run.
"""
from __future__ import annotations

from typing import Optional

import torch

MAP_AUTO = -1  # map_layer value: the middle transformer block
MAP_MAX_BYTES = 64 << 20  # packed masks kept per run (device memory while sampling); later steps are dropped


def capture_layer(map_layer: Optional[int], n_layers: Optional[int]) -> Optional[int]:
    """The block whose block mask a forward captures (None: capture off)."""
    if map_layer is None:
        return None
    if map_layer >= 0:
        return int(map_layer)
    return n_layers // 2 if n_layers else 0


def keep_step_mask(run, step: int, map_mask: tuple, sigma) -> None:
    """Keep a forward's captured (packed, NK) mask for its step, within MAP_MAX_BYTES per run."""
    if step in run.map_masks:
        return
    packed, nk = map_mask
    nbytes = packed.numel() * packed.element_size()
    if run.map_bytes + nbytes <= MAP_MAX_BYTES:
        run.map_masks[step] = (packed, nk, sigma)
        run.map_bytes += nbytes
    else:
        run.map_dropped += 1


def finish_map(run, readout: Optional[dict], node_id, preset, map_layer_setting, block_q: int, block_k: int) -> dict:
    """What the Sparge Sparsity Map node draws, on the CPU (called once per run, at its end)."""
    steps = sorted(run.map_masks)
    masks = {}
    if steps:
        flat = torch.cat([run.map_masks[s][0].reshape(-1) for s in steps]).cpu()
        off = 0
        for s in steps:
            packed, nk, sigma = run.map_masks[s]
            n = packed.numel()
            masks[s] = {"packed": flat[off:off + n].reshape(packed.shape), "nk": nk, "sigma": sigma}
            off += n
    r = readout or {}
    return {
        "node_id": node_id,
        "block_q": block_q,
        "block_k": block_k,
        "prompt_id": r.get("prompt_id"),
        "preset": preset,
        "map_layer": run.map_layer,
        "map_layer_setting": map_layer_setting,
        "n_layers": run.n_layers,
        "masks": masks,  # step -> {"packed": uint8 (H, NQ, ceil(NK/8)), "nk", "sigma"}
        "dropped_steps": run.map_dropped,
        "map_dense": dict(run.map_dense),
        "hilbert": bool(r.get("hilbert_used")),
        "grid": (r.get("hilbert") or {}).get("grid"),
        "n_steps": run.n_steps,
        "steps": [s.get("step") for s in r.get("per_step", [])],
        "per_step_sparsity": r.get("per_step_sparsity", []),
        "layer_step_sparsity": r.get("layer_step_sparsity", []),
        "layers_seen": r.get("layers_seen"),
        "sparsity": r.get("sparsity"),
    }
