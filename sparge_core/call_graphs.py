"""Whole sparse calls replayed as CUDA graphs: the host time of a call without its Python (issue 14).

A sparse call on the Triton path queues ~8 kernel launches and ~20 small torch ops; at short
sequences (7,800 tokens) the GPU finishes them faster than Python issues them. A CUDA graph of the
call replays all of it with one launch.

A graph bakes in the address of every tensor its kernels touch. So a graph here is keyed on the
addresses of everything the call reads or writes from outside its own work: the caller's q, k, v,
the output (allocated by the caller before the lookup), and the small cached tensors the call reads
(per-head thresholds, the Hilbert permutation), with their shapes, strides and the call's settings.
A key that matches means the current call's tensors lie exactly where the graph reads and writes,
so a replay computes this call: nothing is copied in or out. The small cached tensors are also kept
alive by the entry, so their memory cannot be handed to something else while a graph may read it.
The caller's tensors are not kept (that would hold a model's activations): their addresses are only
ever trusted through the key of the call that owns them.

In a sampling run the same addresses come back call after call (the caching allocator repeats its
pattern every forward), so a key is captured the second time it is seen (a first sighting may be a
one-off) and replayed from then on. The intermediates of every graph live in one memory pool shared
by the graphs of this object; they are dead at the end of each call, so the pool is as large as one
call's intermediates, not the sum. The pool stays reserved while the object lives: own one per
sampling run (the node does) and drop it at the end. Calls whose q + k + v exceed `max_bytes` run
as before: their GPU time exceeds their host time anyway, and their pool would hold memory the
model's other layers could use.

Nothing the capture allocates outlives it: the counts a graph writes go into a buffer allocated
before the capture. Under cudaMallocAsync (ComfyUI's default allocator) what a capture allocates is
graph memory that the driver maps only when the graph launches, which shapes two more rules (both
seen on an H200, bench/NOTES.md v26): the kernels are launched with their tensors' addresses
unchecked (kernels/launch.addresses_unchecked; Triton's launcher otherwise asks the driver about
each address and refuses these), and a capture that fails drops the failed body's tensors while the
capture still runs (freeing such memory after the capture aborts the process).

Capture runs on a side stream without synchronizing (torch.cuda.graph synchronizes and empties the
cache on every capture). A capture or replay that fails turns graphs off for this object: the call
and all later ones run as before.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional

import torch

log = logging.getLogger("sparge_attention")

MAX_GRAPHS = 256  # one per (layer's thresholds, address set): a 40-block model with a few address sets
MAX_BYTES = 1 << 30  # q + k + v of a call that may be graphed (Wan 1.3B 480p at 81 frames: 0.6 GB)
CAPTURE_AT = 2  # sightings of a key before it is captured


def _text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def tensor_key(x: torch.Tensor) -> tuple:
    """What a graph bakes in of a tensor it reads: its address, shape, strides and dtype."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype


class CallGraphs:
    """CUDA graphs of sparse calls, replayed by address key (see the module docstring)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, max_bytes: int = MAX_BYTES, capture_at: int = CAPTURE_AT):
        self.max_graphs, self.max_bytes, self.capture_at = int(max_graphs), int(max_bytes), max(1, int(capture_at))
        self._graphs: OrderedDict = OrderedDict()  # key -> (CUDAGraph, its counts output, tensors kept alive)
        self._seen: OrderedDict = OrderedDict()  # key -> sightings, of keys not captured yet
        self._sides: dict = {}  # device -> (capture stream, memory pool)
        self.disabled: Optional[str] = None  # why graphs are off for this object
        self.replays = self.captures = self.eager = 0

    def wants(self, *tensors: torch.Tensor) -> bool:
        """Whether a call on these tensors may run through a graph: CUDA, eager (not traced by
        torch.compile, not inside a caller's own graph capture), within the byte budget."""
        if self.disabled is not None or tensors[0].device.type != "cuda":
            return False
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return False
        return sum(t.numel() * t.element_size() for t in tensors) <= self.max_bytes

    def run(self, key: tuple, keep: tuple, body: Callable[[torch.Tensor], None], counts: int,
            device: torch.device) -> torch.Tensor:
        """body(dst) queues one call's work on `device` and writes `counts` int64 results of it into
        dst (a 1-D tensor on `device`). Returns those results: from a replay of the graph of `key`,
        from a fresh capture of body, or from body itself run as usual. keep: tensors the graph reads
        that are not in the caller's hands (kept alive with it)."""
        def eager():
            self.eager += 1
            dst = torch.empty(counts, dtype=torch.int64, device=device)
            body(dst)
            return dst

        hit = self._graphs.get(key)
        captured = hit is None
        if hit is not None:
            self._graphs.move_to_end(key)
        else:
            n = self._seen.pop(key, 0) + 1
            if n < self.capture_at or self.disabled is not None:
                self._seen[key] = n
                while len(self._seen) > 4 * self.max_graphs:
                    self._seen.popitem(last=False)
                return eager()
            hit = self._capture(body, counts, keep, device)
            if hit is None:
                return eager()
            self._graphs[key] = hit
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            self.captures += 1
        try:  # a capture runs nothing: its first replay computes this call
            hit[0].replay()
        except Exception as e:  # never seen; a launch the driver refuses runs as usual, once and for all
            self._disable("replaying", _text(e))
            return eager()
        self.replays += 0 if captured else 1
        return hit[1].clone()  # the graph's own buffer is overwritten by its next replay

    def _capture(self, body, counts, keep, device):
        from ..kernels.launch import addresses_unchecked  # here: sparge_core imports no Triton until a kernel runs

        side = self._sides.get(device)
        if side is None:
            with torch.cuda.device(device):
                side = self._sides[device] = (torch.cuda.Stream(device), torch.cuda.graph_pool_handle())
        g = torch.cuda.CUDAGraph()
        dst = torch.empty(counts, dtype=torch.int64, device=device)  # before the capture: see the docstring
        # capture records work, it runs none of it: the side stream need not wait for the current
        # one, and the replay is ordered on the current stream like any launch
        failed = None
        try:
            with torch.cuda.stream(side[0]):
                g.capture_begin(pool=side[1], capture_error_mode="thread_local")
                try:
                    with addresses_unchecked():
                        body(dst)
                except Exception as e:  # e.g. an op that synchronizes: never graphed again by this object
                    # only its text is kept: the traceback, and with it the body's tensors, goes
                    # here, inside the capture (see the module docstring)
                    failed = _text(e)
                finally:
                    g.capture_end()
        except Exception as e:
            failed = failed or _text(e)
        if failed is not None:
            self._disable("capturing", failed)
            return None
        return g, dst, keep

    def _disable(self, doing: str, why: str) -> None:
        self.disabled = f"{doing}: {why}"
        self._graphs.clear()
        log.warning("Sparge Attention: %s a CUDA graph of the sparse call failed (%s); this run's calls launch "
                    "their kernels one by one instead", doing, why)

    def summary(self) -> dict:
        """Counts for logs and benchmarks: replays, captures, calls run as usual, graphs held."""
        return {"replays": self.replays, "captures": self.captures, "eager": self.eager, "graphs": len(self._graphs),
                "disabled": self.disabled}
