"""What the override reads off ComfyUI's model and sampling state (no imports of ComfyUI itself:
these are the attributes ComfyUI 0.3.75's models and samplers carry; see shared/COMFYUI.md)."""
from __future__ import annotations

from typing import Optional

import torch


def count_layers(dm) -> Optional[int]:
    """Transformer blocks of a diffusion model (HunyuanVideo-style: double + single blocks)."""
    if dm is None:
        return None
    n = 0
    for name in ("double_blocks", "single_blocks"):
        n += len(getattr(dm, name, ()) or ())
    if n:
        return n
    for name in ("blocks", "transformer_blocks", "joint_blocks", "layers"):
        try:
            n = len(getattr(dm, name))
        except (AttributeError, TypeError):
            continue
        if n:
            return n
    return None


def double_blocks(dm) -> int:
    """HunyuanVideo-style double blocks (single block i is then layer double_blocks + i)."""
    return len(getattr(dm, "double_blocks", ()) or ())


def grid_candidates(dm, x) -> tuple:
    """The latent's (t, h, w) token grids from x (B, C, T, H, W) and the model's patch_size:
    ceil and floor patching (one grid when they agree), () when unknown."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return ()
    patch = getattr(dm, "patch_size", None)
    try:
        patch = tuple(int(p) for p in patch)
    except TypeError:
        return ()
    if len(patch) != 3 or min(patch) <= 0:
        return ()
    dims = x.shape[2:]
    ceil = tuple(-(-int(s) // p) for s, p in zip(dims, patch))
    floor = tuple(int(s) // p for s, p in zip(dims, patch))
    return (ceil,) if ceil == floor else (ceil, floor)


def context_tokens(context) -> Optional[int]:
    """Text tokens of the forward's conditioning (B, T, C), None when not given."""
    return int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() == 3 else None


def step_of(transformer_options: dict):
    """(step index within this sampler's run, sigma, percent of its steps) or Nones."""
    sig = transformer_options.get("sigmas")
    ss = transformer_options.get("sample_sigmas")
    if not isinstance(sig, torch.Tensor) or sig.numel() == 0:
        return None, None, None
    s = float(sig.flatten()[0])
    if not isinstance(ss, torch.Tensor) or ss.numel() < 2:
        return None, s, None
    arr = ss.detach().flatten().float().cpu().tolist()
    n = len(arr) - 1
    idx = None
    for i in range(n):
        if abs(arr[i] - s) <= 1e-5 * max(1.0, abs(s)):
            idx = i
            break
    if idx is None:  # a sub-step of a multi-stage sampler: the step that started above it
        above = [i for i in range(n) if arr[i] >= s]
        idx = above[-1] if above else 0
    return idx, s, idx / n


def model_shape(model_patcher) -> dict:
    """{family, blocks, heads} of a ModelPatcher's diffusion model (None where unknown)."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    cfg = getattr(base, "model_config", None)
    family = type(cfg).__name__ if cfg is not None else (type(base).__name__ if base is not None else None)
    heads = getattr(dm, "num_heads", None)
    return {"family": family, "blocks": count_layers(dm), "heads": int(heads) if isinstance(heads, int) else None}
