"""Programmatic dependent launch (PDL; Hopper and later) between the kernels of a call.

A call's kernels run back to back on one stream, each reading what the ones before it wrote. In
plain stream order a kernel is launched only once the kernel before it has completed: its launch
and the start of its programs follow that kernel's last programs. Launched with PDL, its programs
are placed on the SMs as the kernel before it drains, and wait there.

The contract that keeps that safe, in every kernel that `Kernel` (launch.py) launches:
`grid_dependency(PDL)` is its first statement, before any load or store. It waits until the kernel
before it has completed and its writes are visible (griddepcontrol.wait), then lets the kernel
after it be launched (griddepcontrol.launch_dependents). As every kernel waits before it touches
memory, a kernel's completion implies that of every kernel before it: a kernel may read what any
earlier kernel wrote, and none of its stores lands on memory an earlier kernel still reads (a
CUDA graph's allocator reuses buffers within a call). A kernel launched without PDL (torch's own,
or ours off Hopper) follows the one before it in plain stream order, and the wait is a no-op.
"""
from functools import lru_cache

import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton launches without PDL (pdl_options)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """The first statement of every kernel launched through `Kernel`: with PDL, wait for the
    kernel before this one, then let the next one launch (module docstring)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@lru_cache(maxsize=None)
def pdl_options(arch: int) -> dict:
    """The launch options a kernel of the pack takes on a CUDA GPU of this arch (compute capability
    as 90): PDL (the kernel's constexpr) and Triton's launch_pdl on Hopper and later, where the
    instructions exist; {} elsewhere (the kernels' PDL defaults to off)."""
    if arch < 90 or gdc_wait is None:
        return {}
    return {"PDL": True, "launch_pdl": True}
