"""Layouts at the edge: the core works in (B, H, N, D)."""
import torch
from einops import rearrange

LAYOUTS = ("HND", "NHD")


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "HND":
        return x
    if layout == "NHD":
        if not isinstance(x, torch.Tensor) or x.dim() != 4:  # a clear ValueError, not einops' error
            raise ValueError(f"an NHD tensor must be 4-D (B, N, H, D), got {getattr(x, 'shape', type(x))}")
        return rearrange(x, "b n h d -> b h n d")
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def from_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else rearrange(x, "b h n d -> b n h d")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's (B, N, H*D) -> (B, H, N, D)."""
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b h n d -> b n (h d)")
