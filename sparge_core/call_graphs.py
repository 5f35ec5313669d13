"""Whole sparse calls replayed as CUDA graphs: the host time of a call without its Python (issue 14).

A sparse call on the Triton path queues ~8 kernel launches and ~20 small torch ops; at short
sequences (7,800 tokens) the GPU finishes them faster than Python issues them. A CUDA graph of the
call replays all of it with one launch.

A graph bakes in every argument of every kernel, addresses too. The caller's q, k, v and the
call's output are not baked in: the kernels that touch them read their addresses from a small
int64 table on the device (kernels/caller_addrs.py). Each call's addresses go in, and its counts
(kept blocks, P.V-skipped blocks) come out, through rings that a graph's first and last kernels
read and write (pull_table, push_counts): the host writes the addresses into pinned memory and
launches the graph, with no copy call of its own, and the counts it returns are a view of their
row. So one graph serves every call of the same shapes and settings wherever its tensors lie:
under cudaMallocAsync (ComfyUI's default allocator) a model's tensors land elsewhere from one
forward to the next, and graphs keyed on their addresses were almost never replayed (bench/NOTES.md
v27). The per-head thresholds go in through the table too (sparge_core/graphed.py), so the blocks of a
model, whose thresholds the error target sets one by one, share one graph per shape: a run
captures one graph instead of one per block (29 at Wan 1.3B; each capture with its first replay
costs milliseconds). A graph is keyed on the caller's tensors' shapes, strides and dtypes, the
call's settings and the addresses of the small cached tensors it bakes in (the Hilbert
permutation), which the entry keeps alive so their memory cannot be handed to something else while
a graph may read it. The caller's tensors must be 16-byte aligned (the kernels read them as such;
`wants` checks).

A key is captured the second time it is seen (a first sighting may be a one-off) and replayed from
then on. The intermediates of every graph live in one memory pool shared by the graphs of this
object; they are dead at the end of each call, so the pool is as large as one call's
intermediates, not the sum. The pool stays reserved while the object lives: own one per sampling
run (the node does) and `release()` it at the end. Calls whose q + k + v exceed `max_bytes` run as before:
their GPU time exceeds their host time anyway, and their pool would hold memory the model's other
layers could use.

Nothing the capture allocates outlives it: the counts a graph writes go into a buffer allocated
before the capture, and the address table and the rings are allocated once per device, for the
process (`_Side`). Under cudaMallocAsync what a capture allocates is graph memory that the driver
maps only when the graph launches, which shapes two more rules (both seen on an H200,
bench/NOTES.md v26): the kernels are launched with their tensors' addresses unchecked
(kernels/launch.addresses_unchecked; Triton's launcher otherwise asks the driver about each address
and refuses these), and a capture that fails drops the failed body's tensors while the capture
still runs (freeing such memory after the capture aborts the process).

Capture runs on a side stream without synchronizing (torch.cuda.graph synchronizes and empties the
cache on every capture). A capture or replay that fails turns graphs off for this object: the call
and all later ones run as before.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
from collections import OrderedDict
from typing import Callable, Optional

import torch

log = logging.getLogger("sparge_attention")

MAX_GRAPHS = 256  # one per (shape, settings): a model's few shapes (CFG batch, text) under a few settings
MAX_BYTES = 1 << 30  # q + k + v of a call that may be graphed (Wan 1.3B 480p at 81 frames: 0.6 GB)
CAPTURE_AT = 2  # sightings of a key before it is captured


def _text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def layout_key(x: torch.Tensor) -> tuple:
    """What a graph bakes in of a caller's tensor it reads through the address table: its shape,
    strides and dtype (not its address)."""
    return tuple(x.shape), x.stride(), x.dtype


ALIGN = 16  # bytes: the kernels read the caller's tensors through the table as 16-byte aligned
TABLE_SLOTS = 16  # addresses a call may pass (a power of two: the sparse call passes q, k, v, out and up to 5
# thresholds, and when it measures too the measurement's sums and seed)
COUNT_SLOTS = 8  # counts a call may return (the sparse call returns 2)
RING_ROWS = 16384  # calls whose addresses and counts the rings hold (one sampling run: a few thousand)
_QUARTER = RING_ROWS // 4


class _Side:
    """What every graph on one device shares, made on the device's first graphed call and kept for
    the process: graphs bake in these addresses, and calls queued by a CallGraphs already dropped
    may still read them. The capture stream; the address table the kernels read; the rings through
    which each call's addresses go in and its counts come out (kernels/caller_addrs.py:
    pull_table, push_counts) with their device counter; the host's own count of the calls queued;
    and the stream every call through the rings runs on (the first one's: the rings are read and
    written in that stream's order)."""

    def __init__(self, device, stream: int):
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)
            self.table = torch.zeros(TABLE_SLOTS, dtype=torch.int64, device=device)
            self.counter = torch.zeros(1, dtype=torch.int64, device=device)
            self.counts = torch.zeros(RING_ROWS, COUNT_SLOTS, dtype=torch.int64, device=device)
            self.addresses = torch.zeros(RING_ROWS, TABLE_SLOTS, dtype=torch.int64, pin_memory=True)
        self.calls_stream = stream
        self.laps = [None] * 4  # an event per quarter of the ring: its calls have run
        self._host = self.addresses.numpy()  # written through numpy: no torch op per call
        # the counts ring's rows narrowed to each count a call may return, as views made by one unbind
        # on a width's first use: a call's counts are then a list item (a select per call took ~5 us of
        # an H100 host's ~90, bench/host_breakdown.py; 16,384 views hold ~11 MB of host memory)
        self._rows: list = [None] * (COUNT_SLOTS + 1)
        self.next = 0  # the ring row of the next call, as the device counter will name it

    def write(self, addresses: tuple) -> int:
        """Puts a call's addresses into the next row of the host ring; returns the row. Before a
        quarter of the ring is written again, the calls that read it one lap ago must have run (an
        event recorded then; in practice long done: a lap is RING_ROWS calls)."""
        row = self.next
        if row % _QUARTER == 0:
            q = row // _QUARTER
            done = torch.cuda.Event()
            done.record()
            self.laps[(q - 1) % 4] = done  # the calls of the previous quarter are before it
            if self.laps[q] is not None:
                self.laps[q].synchronize()
        self._host[row, :len(addresses)] = addresses
        self.next = (row + 1) % RING_ROWS
        return row

    def counts_of(self, row: int, counts: int) -> torch.Tensor:
        """The first `counts` counts of a row: a view, valid for the next RING_ROWS calls."""
        rows = self._rows[counts]
        if rows is None:
            rows = self._rows[counts] = self.counts[:, :counts].unbind(0)
        return rows[row]

    def unwrite(self, row: int) -> None:
        """A call that failed before its counts were pushed: the device counter did not move."""
        self.next = row

    def queue(self, body, dst: torch.Tensor) -> None:
        """One call's work between the rings, launched or captured alike: the addresses of the row
        the counter names go into the table, body(dst, table) runs on them, dst goes out into that
        row of the counts ring and the counter steps."""
        from ..kernels.caller_addrs import pull_table, push_counts  # no Triton import until a kernel runs

        pull_table(self.addresses, self.counter, self.table)
        body(dst, self.table)
        push_counts(dst, self.counter, self.counts)


def _current_stream(device: torch.device) -> int:
    """The current stream of `device` as its cudaStream_t (torch.cuda.current_stream(device).cuda_stream
    without making a Stream object: asked on every graphed call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None and device.index is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=1)
def _driver():
    """The CUDA driver library (ctypes), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return None


def _trim_graph_memory(device: torch.device) -> bool:
    """cuDeviceGraphMemTrim(device): graph memory no graph uses goes back to the driver's free
    memory. The driver API, through ctypes (torch exposes no binding for it). False when it could
    not be called."""
    lib = _driver()
    if lib is None or not hasattr(lib, "cuDeviceGraphMemTrim") or device.index is None:
        return False
    handle = ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(handle), ctypes.c_int(device.index)) != 0:
        return False
    return lib.cuDeviceGraphMemTrim(handle) == 0


_SIDES: dict = {}  # device -> _Side, for the process (see _Side)
_SIDES_LOCK = threading.Lock()


def _side_of(device, stream: int) -> _Side:
    side = _SIDES.get(device)
    if side is None:
        with _SIDES_LOCK:
            side = _SIDES.get(device)
            if side is None:
                side = _SIDES[device] = _Side(device, stream)
    return side


class CallGraphs:
    """CUDA graphs of sparse calls, replayed by key (see the module docstring)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, max_bytes: int = MAX_BYTES, capture_at: int = CAPTURE_AT):
        self.max_graphs, self.max_bytes, self.capture_at = int(max_graphs), int(max_bytes), max(1, int(capture_at))
        self._graphs: OrderedDict = OrderedDict()  # key -> (CUDAGraph, tensors kept alive, pool)
        self._seen: OrderedDict = OrderedDict()  # key -> sightings, of keys not captured yet
        self._pools: dict = {}  # device -> the memory pool its graphs are captured into
        self.disabled: Optional[str] = None  # why graphs are off for this object
        self.replays = self.captures = self.eager = 0

    def wants(self, *tensors: torch.Tensor) -> bool:
        """Whether a call on these tensors may run through a graph: on one CUDA device, eager (not traced by
        torch.compile, not inside a caller's own graph capture), 16-byte aligned, within the byte
        budget, on the stream the first such call on the device ran on (the address table, the
        rings and the pool's memory are reused call after call in one stream's order; _Side)."""
        dev = tensors[0].device
        if self.disabled is not None or dev.type != "cuda" or any(t.device != dev for t in tensors):
            return False
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return False
        if any(t.data_ptr() % ALIGN for t in tensors):
            return False
        side = _SIDES.get(dev)
        if side is not None and side.calls_stream != _current_stream(dev):
            return False
        return sum(t.numel() * t.element_size() for t in tensors) <= self.max_bytes

    def run(self, key: tuple, keep: tuple, body: Callable[[torch.Tensor, Optional[torch.Tensor]], None], counts: int,
            device: torch.device, addresses: tuple = (), outputs: tuple = ()) -> torch.Tensor:
        """body(dst, table) queues one call's work on `device` and writes `counts` int64 results of
        it into dst (a 1-D tensor on `device`). table: None, or the int64 address table whose slots
        hold `addresses` (the caller's tensors, 16-byte aligned) when the work runs; the body's
        kernels then read and write those tensors through it. Returns the results: from a replay of
        the graph of `key`, from a fresh capture of body, or from body itself run as usual (a view
        of the counts ring, valid for the next RING_ROWS calls). keep: tensors the graph reads that
        are not in the caller's hands (kept alive with it). outputs: tensors, allocated before this
        call, that body writes besides dst; a graph captured from this call writes those same ones on
        every replay (`outputs_of(key)`: read them before the key's next call)."""
        if len(addresses) > TABLE_SLOTS or not 0 < counts <= COUNT_SLOTS:
            raise ValueError(f"{len(addresses)} addresses and {counts} counts; a call passes at most "
                             f"{TABLE_SLOTS} and returns 1 to {COUNT_SLOTS}")
        out = self.replay(key, device, addresses, counts)
        if out is not None:
            return out
        n = self._seen.pop(key, 0) + 1
        if n < self.capture_at or self.disabled is not None:
            self._seen[key] = n
            while len(self._seen) > 4 * self.max_graphs:
                self._seen.popitem(last=False)
            return self._eager(body, counts, device, addresses)
        hit = self._capture(body, counts, keep + outputs, device)
        if hit is None:
            if self.disabled is None:  # a kernel variant not launched yet: launch it, capture next time
                self._seen[key] = n - 1
            return self._eager(body, counts, device, addresses)
        hit = self._graphs[key] = hit + (outputs,)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        self.captures += 1
        # a capture runs nothing: its first replay computes this call
        out = self._replay(hit, device, addresses, counts)
        return out if out is not None else self._eager(body, counts, device, addresses)

    def replay(self, key: tuple, device: torch.device, addresses: tuple, counts: int) -> Optional[torch.Tensor]:
        """The call of `key` replayed from its graph, with `addresses` in the table: its counts (as
        `run` returns them), or None when no graph of `key` is held (nothing ran; `run` then
        launches or captures the call). The whole per-call host work of a graphed call: callers that
        can build the key without the call's tensors (sparge_core.graphed.replay_graphed) try this first."""
        hit = self._graphs.get(key)
        if hit is None:
            return None
        self._graphs.move_to_end(key)
        out = self._replay(hit, device, addresses, counts)
        self.replays += out is not None
        return out

    def outputs_of(self, key: tuple) -> Optional[tuple]:
        """The outputs (see `run`) the graph of `key` writes, or None when no graph of it is held."""
        hit = self._graphs.get(key)
        return None if hit is None else hit[3]

    def _replay(self, hit, device, addresses, counts) -> Optional[torch.Tensor]:
        side = _SIDES[device]
        row = side.write(addresses)
        try:
            hit[0].replay()
        except Exception as e:  # never seen; a launch the driver refuses runs as usual, once and for all
            side.unwrite(row)
            self._disable("replaying", _text(e))
            return None
        return side.counts_of(row, counts)

    def _eager(self, body, counts, device, addresses):
        """The call launched as usual. While graphs are on, through the same table and rings as a
        replay (so the kernel variants a capture launches get compiled)."""
        self.eager += 1
        dst = torch.empty(counts, dtype=torch.int64, device=device)
        side = self._side(device) if self.disabled is None else None
        if side is None:
            body(dst, None)
            return dst
        row = side.write(addresses)
        try:
            side.queue(body, dst)
        except BaseException:
            side.unwrite(row)
            raise
        return side.counts_of(row, counts)

    def _side(self, device) -> Optional[_Side]:
        """The device's _Side, or None with graphs turned off when it cannot be made."""
        try:
            return _side_of(device, _current_stream(device))
        except Exception as e:  # e.g. no pinned memory to be had: the calls launch as usual
            self._disable("setting up", _text(e))
            return None

    def _pool(self, device, renew: bool = False):
        """The memory pool `device`'s graphs share. A pool handle is no more than an id: torch's
        allocator forgets the pool once no graph captured into it lives, and a later capture into
        that id fails an internal assert (seen on an H200, both allocators). So a capture dropped
        while no held graph uses the pool (renew) takes a fresh handle for the next one."""
        pool = self._pools.get(device)
        if pool is None or (renew and not any(e[2] == pool for e in self._graphs.values())):
            pool = self._pools[device] = torch.cuda.graph_pool_handle()
        return pool

    def _capture(self, body, counts, keep, device):
        """(graph, tensors it reads that must live as long, pool), or None: the call then runs as
        usual (graphs turned off with the reason, or a capture to try again on the key's next
        sighting)."""
        # here: sparge_core imports no Triton until a kernel runs
        from ..kernels.launch import NotLaunchedYet, addresses_unchecked

        side = self._side(device)
        if side is None:
            return None
        pool = self._pool(device)
        g = torch.cuda.CUDAGraph()
        dst = torch.empty(counts, dtype=torch.int64, device=device)  # before the capture: see the docstring
        # capture records work, it runs none of it: the side stream need not wait for the current
        # one, and the replay is ordered on the current stream like any launch
        failed = retry = None
        try:
            with torch.cuda.stream(side.stream):
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    with addresses_unchecked():
                        side.queue(body, dst)
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
        return g, keep + (dst,), pool

    def _disable(self, doing: str, why: str) -> None:
        self.disabled = f"{doing}: {why}"
        self._graphs.clear()
        log.warning("Sparge Attention: %s a CUDA graph of the sparse call failed (%s); this run's calls launch "
                    "their kernels one by one instead", doing, why)

    def release(self) -> None:
        """Drops every graph, and with them their pool (torch frees a pool once no graph captured
        into it lives); the object captures anew if used again. Under cudaMallocAsync what the graphs
        allocated is graph memory, which the driver keeps for graphs after they are destroyed
        (torch.cuda.empty_cache does not give it back): it is trimmed here (_trim_graph_memory),
        after a synchronize (the memory of a graph still queued is not trimmed), so that what runs
        after a render (the VAE decode) can have it. Call it when the calls are over (the node does,
        at the end of each sampling run)."""
        devices = [d for d in self._pools if d.type == "cuda"]
        self._graphs.clear()
        self._seen.clear()
        self._pools.clear()
        if devices and torch.cuda.get_allocator_backend() == "cudaMallocAsync":
            for dev in devices:
                torch.cuda.synchronize(dev)
                if not _trim_graph_memory(dev):
                    log.info("Sparge Attention: could not trim the CUDA graphs' memory on %s "
                             "(cuDeviceGraphMemTrim); the driver keeps it for graphs", dev)

    def summary(self) -> dict:
        """Counts for logs and benchmarks: replays, captures, calls run as usual, graphs held."""
        return {"replays": self.replays, "captures": self.captures, "eager": self.eager, "graphs": len(self._graphs),
                "disabled": self.disabled}
