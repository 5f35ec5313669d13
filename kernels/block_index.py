"""Block map -> per-row lists of kept key blocks (count + ascending indices)."""
import torch
import triton
import triton.language as tl

from .host_math import next_pow2
from .launch import Kernel


@triton.jit
def _block_index_kernel(MASK, CNT, IDX, NK, NK_POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NK_POW2)
    keep = tl.load(MASK + row * NK + offs, mask=offs < NK, other=0).to(tl.int32)
    pos = tl.cumsum(keep, 0) - keep  # exclusive prefix sum: where each kept block lands
    tl.store(IDX + row * NK + pos, offs, mask=keep > 0)
    tl.store(CNT + row, tl.sum(keep, 0))


_block_index = Kernel(_block_index_kernel)


def block_map_to_index(mask: torch.Tensor):
    """mask: bool (B, H, NQ, NK). Returns (counts int32 (B,H,NQ), indices int32 (B,H,NQ,NK)).

    Index entries past a row's count are left unwritten: consumers read only the first `count`."""
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"block_map_to_index wants a 4-D bool mask, got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.contiguous()
    *lead, nk = mask.shape
    counts = torch.empty(lead, dtype=torch.int32, device=mask.device)
    idx = torch.empty(mask.shape, dtype=torch.int32, device=mask.device)
    rows = counts.numel()
    if rows:
        _block_index[(rows,)](mask.view(torch.uint8), counts, idx, nk, NK_POW2=next_pow2(nk))
    return counts, idx
