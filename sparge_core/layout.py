"""Layouts at the edge: the core works in (B, H, N, D). Plain views (transpose, unflatten): these run
on every attention call, and einops' pattern parsing cost ~7 us of host time each."""
import torch

LAYOUTS = ("HND", "NHD")


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "HND":
        return x
    if layout == "NHD":
        if not isinstance(x, torch.Tensor) or x.dim() != 4:  # a clear ValueError, not transpose's IndexError
            raise ValueError(f"an NHD tensor must be 4-D (B, N, H, D), got {getattr(x, 'shape', type(x))}")
        return x.transpose(1, 2)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def from_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's (B, N, H*D) -> (B, H, N, D)."""
    if x.shape[-1] % heads:
        raise ValueError(f"the last dim {x.shape[-1]} does not split into {heads} heads")
    # a plain view (splitting a dim never needs a copy); Tensor.unflatten's Python wrapper costs
    # ~2 us more per tensor, three tensors per attention call
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> ComfyUI's (B, N, H*D)."""
    return x.transpose(1, 2).flatten(2)
