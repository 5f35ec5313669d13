"""The sparsity structure as data, separate from any kernel (like FlexAttention's BlockMask).

For each (batch, head, query block) we keep the number of kept key blocks and their indices in
ascending order; entries past the count are padding and never read. Ascending order matters:
the P.V skip rule depends on the order in which blocks are visited, and the kernel and the
reference visit them the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def block_pairs(B: int, H: int, n_q: int, n_k: int, block_q: int, block_k: int) -> int:
    """Query-block x key-block pairs a dense call on (B, H, n_q) queries and n_k keys computes."""
    return B * H * num_blocks(n_q, block_q) * num_blocks(n_k, block_k)


def causal_block_mask(nq: int, nk: int, block_q: int, block_k: int, n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(NQ, NK) bool: key block j has at least one key at or before the last query of block i.

    Queries and keys are aligned at the end (standard when n_q == n_k)."""
    last_q = torch.clamp((torch.arange(nq, device=device) + 1) * block_q, max=n_q) - 1 + (n_k - n_q)
    first_k = torch.arange(nk, device=device) * block_k
    return first_k[None, :] <= last_q[:, None]


@dataclass
class SpargeBlockMask:
    kv_num_blocks: torch.Tensor  # (B, H, NQ) int32
    kv_indices: torch.Tensor  # (B, H, NQ, NK) int32, ascending, first kv_num_blocks valid
    block_q: int
    block_k: int
    seq_len_q: int
    seq_len_k: int

    @property
    def shape(self):
        return tuple(self.kv_indices.shape)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_q: int, block_k: int, seq_len_q: int, seq_len_k: int) -> "SpargeBlockMask":
        """Compact a boolean (B, H, NQ, NK) block map into per-row index lists."""
        check_dense_mask(mask, block_q, block_k, seq_len_q, seq_len_k)
        if mask.is_cuda:
            from ..kernels.block_index import block_map_to_index

            counts, idx = block_map_to_index(mask)
        else:
            counts = mask.sum(-1, dtype=torch.int32)
            # a stable sort of "not kept" puts kept blocks first, in ascending order
            idx = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return cls(counts, idx, block_q, block_k, seq_len_q, seq_len_k)

    def to_dense(self) -> torch.Tensor:
        nk = self.kv_indices.shape[-1]
        dev = self.kv_indices.device
        valid = torch.arange(nk, device=dev) < self.kv_num_blocks[..., None]
        # padding entries may hold anything: send them to a spare column that is dropped
        idx = torch.where(valid, self.kv_indices.long(), nk)
        dense = torch.zeros(*self.kv_indices.shape[:-1], nk + 1, dtype=torch.bool, device=dev)
        dense.scatter_(-1, idx, True)
        return dense[..., :nk]

    def kept(self) -> int:
        return int(self.kv_num_blocks.sum())

    def total(self) -> int:
        return self.kv_indices.numel()

    def density(self) -> float:
        return self.kept() / max(self.total(), 1)


def check_dense_mask(mask: torch.Tensor, block_q: int, block_k: int, seq_len_q: int, seq_len_k: int) -> None:
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"a block mask must be a 4-D bool tensor (B, H, NQ, NK), got {mask.dtype} {tuple(mask.shape)}")
    want = (num_blocks(seq_len_q, block_q), num_blocks(seq_len_k, block_k))
    if tuple(mask.shape[-2:]) != want:
        raise ValueError(
            f"block mask has {tuple(mask.shape[-2:])} blocks, but {seq_len_q}x{seq_len_k} tokens in "
            f"{block_q}x{block_k} blocks need {want}"
        )


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(H, NQ, NK) bool -> (H, NQ, ceil(NK / 8)) uint8, bit j of byte c = block 8c + j. Device ops
    only (no host-to-device copy, no sync)."""
    nk = mask.shape[-1]
    m = mask.to(torch.uint8)
    pad = (-nk) % 8
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    m = m.reshape(*m.shape[:-1], -1, 8)
    bits = torch.arange(8, device=m.device, dtype=torch.uint8)
    return torch.bitwise_left_shift(m, bits).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, nk: int) -> torch.Tensor:
    """Inverse of pack_mask: (..., ceil(NK / 8)) uint8 -> (..., NK) bool."""
    bits = torch.arange(8, device=packed.device, dtype=torch.uint8)
    m = torch.bitwise_and(torch.bitwise_right_shift(packed[..., None], bits), 1).bool()
    return m.reshape(*packed.shape[:-1], -1)[..., :nk]
