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
sparge_core.graphed passes q, k, v and the output at slots 0 to 3, and the addresses of the call's
per-head thresholds from slot 4 on (`pull_values` copies them into the graph's own buffer).

Two small kernels move a call's addresses into a graph and its counts out of it without a copy
call on the host (`pull_table`, `push_counts`). The host writes each call's addresses into the
next row of a ring in pinned host memory, which the GPU reads directly (a 64-bit process maps
pinned memory at the same address on the device); `pull_table`, a graph's first kernel, copies the
row that a device counter names into the table. `push_counts`, its last, copies the call's counts
into the same row of a device ring and steps the counter. Calls on one stream run in order, so the
counter names on the device the row the host wrote for that call, and the counts stay in their
row for the ring's length of calls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Kernel

@triton.jit
def caller_ptr(X, ADDRS, SLOT: tl.constexpr):
    """X, or with SLOT >= 0 the address held in ADDRS[SLOT] as a pointer of X's type."""
    if SLOT >= 0:
        return tl.multiple_of(tl.load(ADDRS + SLOT).to(X.dtype), 16)
    else:
        return X


@triton.jit
def _pull_table_kernel(RING_ADDR, CTR, TABLE, SLOTS: tl.constexpr):
    row = tl.load(CTR)
    ring = RING_ADDR.to(tl.pointer_type(tl.int64))
    offs = tl.arange(0, SLOTS)
    # volatile: the host rewrote this row after the last launch that read it
    tl.store(TABLE + offs, tl.load(ring + row * SLOTS + offs, volatile=True))


@triton.jit
def _push_counts_kernel(SRC, CTR, RING, ROWS, N: tl.constexpr, WIDTH: tl.constexpr):
    row = tl.load(CTR)
    offs = tl.arange(0, WIDTH)
    tl.store(RING + row * WIDTH + offs, tl.load(SRC + offs, mask=offs < N, other=0), mask=offs < N)
    tl.debug_barrier()  # every thread has read the counter before one of them steps it
    tl.store(CTR, (row + 1) % ROWS)


@triton.jit
def _pull_values_kernel(TABLE, DST, N, FIRST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(ROWS):
        src = tl.load(TABLE + FIRST + i).to(tl.pointer_type(tl.float32))
        tl.store(DST + i * N + offs, tl.load(src + offs, mask=offs < N), mask=offs < N)


_pull_table_launch = Kernel(_pull_table_kernel)
_push_counts_launch = Kernel(_push_counts_kernel)
_pull_values_launch = Kernel(_pull_values_kernel)


def _ring_args(ctr: torch.Tensor, ring: torch.Tensor, table_like: torch.Tensor, what: str) -> None:
    if ctr.dtype != torch.int64 or ctr.numel() != 1 or ctr.device != table_like.device:
        raise ValueError(f"{what}: the counter must be one int64 on {table_like.device}")
    if ring.dtype != torch.int64 or ring.dim() != 2 or not ring.is_contiguous():
        raise ValueError(f"{what}: the ring must be a contiguous 2-D int64 tensor")


def pull_table(ring: torch.Tensor, ctr: torch.Tensor, table: torch.Tensor) -> None:
    """table[:] <- ring[ctr] (see the module docstring). ring: (rows, table.numel()) int64 in pinned
    host memory (CPU memory under the interpreter), read by the GPU at its own address."""
    _ring_args(ctr, ring, table, "pull_table")
    if table.dtype != torch.int64 or table.dim() != 1 or ring.shape[1] != table.numel() \
            or table.numel() & (table.numel() - 1):
        raise ValueError("pull_table: the table must be a 1-D int64 tensor, a power of two long, as wide as the ring")
    _pull_table_launch[(1,)](ring.data_ptr(), ctr, table, SLOTS=table.numel(), num_warps=1)


def push_counts(src: torch.Tensor, ctr: torch.Tensor, ring: torch.Tensor) -> None:
    """ring[ctr, :src.numel()] <- src, then ctr <- (ctr + 1) % rows (see the module docstring)."""
    _ring_args(ctr, ring, src, "push_counts")
    if src.dtype != torch.int64 or src.dim() != 1 or not src.is_contiguous() or src.numel() > ring.shape[1] \
            or ring.device != src.device or ring.shape[1] & (ring.shape[1] - 1):
        raise ValueError("push_counts: src must be a contiguous 1-D int64 tensor no wider than the ring "
                         "(a power of two wide), on its device")
    _push_counts_launch[(1,)](src, ctr, ring, ring.shape[0], N=src.numel(), WIDTH=ring.shape[1], num_warps=1)


def pull_values(table: torch.Tensor, first: int, dst: torch.Tensor) -> None:
    """dst[i, :] <- the dst.shape[1] float32 values at the address held in table[first + i], for each
    row i of dst (a call's per-head thresholds: a graph then reads each call's own, wherever they
    lie, and blocks whose thresholds differ share one graph). Each address must hold that many
    float32 values, on the table's device."""
    if table.dtype != torch.int64 or table.dim() != 1 or not 0 <= first or first + dst.shape[0] > table.numel():
        raise ValueError(f"pull_values: {dst.shape[0]} slots from {first} of an int64 address table of "
                         f"{table.numel()}")
    if dst.dtype != torch.float32 or dst.dim() != 2 or not dst.is_contiguous() or dst.device != table.device:
        raise ValueError("pull_values: dst must be a contiguous 2-D float32 tensor on the table's device")
    n = dst.shape[1]
    _pull_values_launch[(1,)](table, dst, n, FIRST=first, ROWS=dst.shape[0], BLOCK=triton.next_power_of_2(n),
                              num_warps=1)


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
