"""What the quantizers (quantize.py for Q and K, quantize_v.py for V) share: the rows of a token
block, gathered in curve order, and their launchers' input checks."""
import torch
import triton
import triton.language as tl

from .config import Launch
from .fp8 import v_key


@triton.jit
def token_rows(PERM, blk, N, BLOCK: tl.constexpr, HAS_PERM: tl.constexpr, PV_ORDER: tl.constexpr):
    """Positions of block blk, whether each holds a token, and the rows of the input they read:
    gathered through PERM (curve order) when HAS_PERM, so the quantizers need no separate permute
    pass. With PV_ORDER (fp8 V) position k holds key v_key(k), the P.V operand's order
    (kernels/fp8.py), so that the output is stored in order: a store through permuted addresses
    kept the tile from its layout change and spilled (sm_90)."""
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    src = v_key(offs_n, PV_ORDER)
    rows = src
    if HAS_PERM:
        rows = tl.load(PERM + src, mask=src < N, other=0)
    return offs_n, src < N, rows


def check_input(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, H, N, D), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be fp16/bf16/fp32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in the head dimension")


def step_rows(launch: Launch, block: int) -> int:
    """The token rows a quantizer program takes per step: launch.block, 0 for the whole block."""
    rows = min(launch.block or block, block)
    if block % rows or rows & (rows - 1):
        raise ValueError(f"steps of {rows} rows must be a power of two dividing the block ({block})")
    return rows


def check_perm(perm, n, device):
    if perm is None:
        return None
    if perm.dtype != torch.int32 or perm.shape != (n,) or perm.device != device:
        raise ValueError(f"perm must be an int32 ({n},) tensor on {device}")
    return perm.contiguous()
