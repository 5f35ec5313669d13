"""What one sparse attention call did. Counts stay on the device until read, so collecting
stats during a render never forces a GPU sync per call."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SpargeStats:
    backend: str  # "triton", "reference" or "dense"
    kept_blocks: torch.Tensor | int = 0  # query-key blocks computed
    total_blocks: int = 0  # blocks dense attention would compute
    pv_skipped: torch.Tensor | int = 0  # kept blocks whose P.V was skipped
    dense_reason: Optional[str] = None  # why the call ran dense, if it did
    block_mask: Optional[object] = field(default=None, repr=False)  # SpargeBlockMask, for pictures
    block_q: int = 0
    block_k: int = 0
    heads: int = 0
    # with sparge_attention(map_first=True): the first batch item's block mask, (H, NQ, ceil(NK / 8))
    # uint8 (blockmask.pack_mask), also from a graphed call (whose stats carry no block_mask)
    first_map: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.kept_blocks) / self.total_blocks if self.total_blocks else 0.0

    @property
    def pv_skip_fraction(self) -> float:
        kept = float(self.kept_blocks)
        return float(self.pv_skipped) / kept if kept else 0.0

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "kept_blocks": int(self.kept_blocks),
            "total_blocks": int(self.total_blocks),
            "pv_skipped": int(self.pv_skipped),
            "sparsity": self.sparsity,
            "pv_skip_fraction": self.pv_skip_fraction,
            "dense_reason": self.dense_reason,
        }
