"""Whole sparse calls replayed as CUDA graphs: the host time of a call without its Python (issue 14).

A sparse call on the Triton path queues ~8 kernel launches and ~20 small torch ops; at short
sequences (7,800 tokens) the GPU finishes them faster than Python issues them. A CUDA graph of the
call replays all of it with one launch.

A graph bakes in every argument of every kernel, addresses too. The caller's q, k, v and the
call's output are not baked in: the kernels that touch them read their addresses from a small
int64 table on the device (kernels/caller_addrs.py), which `run` fills before each replay with a
copy ordered on the stream. So one graph serves every call of the same shapes and settings
wherever its tensors lie: under cudaMallocAsync (ComfyUI's default allocator) a model's tensors
land elsewhere from one forward to the next, and graphs keyed on their addresses were almost never
replayed (bench/NOTES.md v27). A graph is keyed on the caller's tensors' shapes, strides and dtypes,
the call's settings and the addresses of the small cached tensors the call reads (per-head
thresholds, the Hilbert permutation), which the entry keeps alive so their memory cannot be handed
to something else while a graph may read it. The caller's tensors must be 16-byte aligned (the
kernels read them as such; `wants` checks).

A key is captured the second time it is seen (a first sighting may be a one-off) and replayed from
then on. The intermediates of every graph live in one memory pool shared by the graphs of this
object; they are dead at the end of each call, so the pool is as large as one call's
intermediates, not the sum. The pool stays reserved while the object lives: own one per sampling
run (the node does) and drop it at the end. Calls whose q + k + v exceed `max_bytes` run as before:
their GPU time exceeds their host time anyway, and their pool would hold memory the model's other
layers could use.

Nothing the capture allocates outlives it: the counts a graph writes go into a buffer allocated
before the capture, and the address table is allocated with the object. Under cudaMallocAsync what
a capture allocates is graph memory that the driver maps only when the graph launches, which
shapes two more rules (both seen on an H200, bench/NOTES.md v26): the kernels are launched with
their tensors' addresses unchecked (kernels/launch.addresses_unchecked; Triton's launcher otherwise
asks the driver about each address and refuses these), and a capture that fails drops the failed
body's tensors while the capture still runs (freeing such memory after the capture aborts the
process).

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

MAX_GRAPHS = 256  # one per (block's thresholds, shape): a 40-block model with a few shapes (CFG batch, text)
MAX_BYTES = 1 << 30  # q + k + v of a call that may be graphed (Wan 1.3B 480p at 81 frames: 0.6 GB)
CAPTURE_AT = 2  # sightings of a key before it is captured


def _text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def layout_key(x: torch.Tensor) -> tuple:
    """What a graph bakes in of a caller's tensor it reads through the address table: its shape,
    strides and dtype (not its address)."""
    return tuple(x.shape), x.stride(), x.dtype


ALIGN = 16  # bytes: the kernels read the caller's tensors through the table as 16-byte aligned
TABLE_SLOTS = 8  # addresses a call may pass (the sparse call passes 4)


class CallGraphs:
    """CUDA graphs of sparse calls, replayed by key (see the module docstring)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, max_bytes: int = MAX_BYTES, capture_at: int = CAPTURE_AT):
        self.max_graphs, self.max_bytes, self.capture_at = int(max_graphs), int(max_bytes), max(1, int(capture_at))
        self._graphs: OrderedDict = OrderedDict()  # key -> (CUDAGraph, its counts output, tensors kept alive, pool)
        self._seen: OrderedDict = OrderedDict()  # key -> sightings, of keys not captured yet
        self._sides: dict = {}  # device -> (capture stream, address table)
        self._pools: dict = {}  # device -> the memory pool its graphs are captured into
        self._written: dict = {}  # device -> the addresses its table holds (as of the stream's order)
        self._streams: dict = {}  # device -> the stream its calls run on
        self.disabled: Optional[str] = None  # why graphs are off for this object
        self.replays = self.captures = self.eager = 0

    def wants(self, *tensors: torch.Tensor) -> bool:
        """Whether a call on these tensors may run through a graph: CUDA, eager (not traced by
        torch.compile, not inside a caller's own graph capture), 16-byte aligned, within the byte
        budget, on the stream the first such call on the device ran on (the address table and the
        pool's memory are reused call after call in one stream's order)."""
        dev = tensors[0].device
        if self.disabled is not None or dev.type != "cuda":
            return False
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return False
        if any(t.data_ptr() % ALIGN for t in tensors):
            return False
        stream = torch.cuda.current_stream(dev).cuda_stream
        if self._streams.setdefault(dev, stream) != stream:
            return False
        return sum(t.numel() * t.element_size() for t in tensors) <= self.max_bytes

    def run(self, key: tuple, keep: tuple, body: Callable[[torch.Tensor, Optional[torch.Tensor]], None], counts: int,
            device: torch.device, addresses: tuple = ()) -> torch.Tensor:
        """body(dst, table) queues one call's work on `device` and writes `counts` int64 results of
        it into dst (a 1-D tensor on `device`). table: None, or the int64 address table whose slots
        hold `addresses` (the caller's tensors, 16-byte aligned) when the work runs; the body's
        kernels then read and write those tensors through it. Returns the results: from a replay of
        the graph of `key`, from a fresh capture of body, or from body itself run as usual. keep:
        tensors the graph reads that are not in the caller's hands (kept alive with it)."""
        def eager():
            self.eager += 1
            dst = torch.empty(counts, dtype=torch.int64, device=device)
            table = None
            if self.disabled is None:  # through the table: the kernel variants a capture launches get compiled
                try:
                    table = self._fill(device, addresses)
                except Exception as e:  # e.g. no pinned memory to be had: the calls launch as usual
                    self._disable("filling the address table of", _text(e))
            body(dst, table)
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
                if self.disabled is None:  # a kernel variant not launched yet: launch it, capture next time
                    self._seen[key] = n - 1
                return eager()
            self._graphs[key] = hit
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            self.captures += 1
        try:  # a capture runs nothing: its first replay computes this call
            self._fill(device, addresses)
            hit[0].replay()
        except Exception as e:  # never seen; a launch the driver refuses runs as usual, once and for all
            self._disable("replaying", _text(e))
            return eager()
        self.replays += 0 if captured else 1
        return hit[1].clone()  # the graph's own buffer is overwritten by its next replay

    def _side(self, device):
        """(capture stream, address table) of `device`, made on first use and kept: the graphs bake
        in the table's address."""
        side = self._sides.get(device)
        if side is None:
            with torch.cuda.device(device):
                side = self._sides[device] = (torch.cuda.Stream(device),
                                              torch.zeros(TABLE_SLOTS, dtype=torch.int64, device=device))
        return side

    def _pool(self, device, renew: bool = False):
        """The memory pool `device`'s graphs share. A pool handle is no more than an id: torch's
        allocator forgets the pool once no graph captured into it lives, and a later capture into
        that id fails an internal assert (seen on an H200, both allocators). So a capture dropped
        while no held graph uses the pool (renew) takes a fresh handle for the next one."""
        pool = self._pools.get(device)
        if pool is None or (renew and not any(e[3] == pool for e in self._graphs.values())):
            pool = self._pools[device] = torch.cuda.graph_pool_handle()
        return pool

    def _fill(self, device, addresses: tuple) -> torch.Tensor:
        """The address table of `device`, holding `addresses` from this point of the current stream
        on. A pinned host copy, not a synchronizing one: torch's pinned-memory cache keeps the host
        buffer until the copy has run. Skipped when the table already holds these addresses."""
        if len(addresses) > TABLE_SLOTS:
            raise ValueError(f"{len(addresses)} addresses; the table holds {TABLE_SLOTS}")
        table = self._side(device)[1]
        if addresses and self._written.get(device) != addresses:
            host = torch.tensor(addresses, dtype=torch.int64, pin_memory=True)
            table[:len(addresses)].copy_(host, non_blocking=True)
            self._written[device] = addresses
        return table

    def _capture(self, body, counts, keep, device):
        # here: sparge_core imports no Triton until a kernel runs
        from ..kernels.launch import NotLaunchedYet, addresses_unchecked

        side, pool = self._side(device), self._pool(device)
        g = torch.cuda.CUDAGraph()
        dst = torch.empty(counts, dtype=torch.int64, device=device)  # before the capture: see the docstring
        # capture records work, it runs none of it: the side stream need not wait for the current
        # one, and the replay is ordered on the current stream like any launch
        failed = retry = None
        try:
            with torch.cuda.stream(side[0]):
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    with addresses_unchecked():
                        body(dst, side[1])
                except NotLaunchedYet:  # e.g. a capture on a key's first sighting (capture_at=1)
                    retry = True
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
        if retry:
            del g  # the dropped capture's hold on the pool goes here, before the pool is asked after
            self._pool(device, renew=True)
            return None
        return g, dst, keep, pool

    def _disable(self, doing: str, why: str) -> None:
        self.disabled = f"{doing}: {why}"
        self._graphs.clear()
        log.warning("Sparge Attention: %s a CUDA graph of the sparse call failed (%s); this run's calls launch "
                    "their kernels one by one instead", doing, why)

    def summary(self) -> dict:
        """Counts for logs and benchmarks: replays, captures, calls run as usual, graphs held."""
        return {"replays": self.replays, "captures": self.captures, "eager": self.eager, "graphs": len(self._graphs),
                "disabled": self.disabled}
