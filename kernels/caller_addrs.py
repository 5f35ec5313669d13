"""The caller's tensors read through an address table: one CUDA graph of a call serves any q, k, v
and output of the same shapes (sparge_core/call_graphs.py).

A graph bakes in every kernel argument, the tensors' addresses too. Under cudaMallocAsync
(ComfyUI's default allocator) a model's q, k, v and the call's output land at other addresses
from one forward to the next, so a graph keyed on them was almost never replayed (bench/NOTES.md
v27). With an address table, the kernels that touch the caller's tensors load those tensors' base
addresses from a small int64 device tensor instead: the graph bakes in the table's address, and
each replay is preceded by a write of the current addresses into it, ordered on the stream.

Each such kernel takes the table and, per caller tensor, a constexpr slot: -1 reads the tensor
argument as usual (a plain call compiles exactly as before), a slot >= 0 reads table[slot] and
treats it as a pointer of the argument's type, 16-byte aligned: the graph's user checks the
alignment of the tensors it passes (Triton's own launch specializes an argument on it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SLOTS = ("q", "k", "v", "out")  # the table's layout, as sparge_core fills it


@triton.jit
def caller_ptr(X, ADDRS, SLOT: tl.constexpr):
    """X, or with SLOT >= 0 the address held in ADDRS[SLOT] as a pointer of X's type."""
    if SLOT >= 0:
        return tl.multiple_of(tl.load(ADDRS + SLOT).to(X.dtype), 16)
    else:
        return X


def addr_args(addr, stand_in: torch.Tensor) -> tuple:
    """(table, slot) kernel arguments of an optional `addr` = (table, slot); without one, a tensor
    the kernel never reads stands in for the table and the slot is -1."""
    if addr is None:
        return stand_in, -1
    table, slot = addr
    if (not isinstance(table, torch.Tensor) or table.dtype != torch.int64 or table.dim() != 1
            or table.device != stand_in.device or not 0 <= int(slot) < table.numel()):
        raise ValueError(f"addr must be (an int64 1-D address table on {stand_in.device}, a slot in it), "
                         f"got {type(table).__name__} and {slot!r}")
    return table, int(slot)
