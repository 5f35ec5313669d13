"""Host time of the layers above the kernels, on any machine (issue 14): what the node's override
and the op add to a sparse call's Python time, apart from the kernels' launches.

bench/host_overhead.py measures the whole call on a GPU (launches included). This bench splits off
what needs no GPU, so each change to it can be measured on a CPU:

  node layer   the override's own time per call inside a sampling run (eligibility, observers, the
               error target's adaptation in its steady state, records), with the sparse call itself
               answered from a cache (this bench swaps nodes/sparse_call.run_sparse; production code
               has no such switch)
  op call      sparge_core.torch_op.call at a shape that runs dense inside sparge_attention (so the
               attention costs ~nothing), minus sparge_attention alone at that shape: the op's
               dispatch and argument conversions
  layouts      split_heads + merge_heads of one call
  API, Triton  sparge_attention on the Triton path (Balanced, a Hilbert grid) with its 7 kernel
               launches skipped: the Python and the small torch ops around them (TRITON_INTERPRET,
               so the launchers run on the CPU; this bench swaps the interpreter's launch for a no-op)

    python bench/host_layers.py [--preset Balanced] [--calls 2000]
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launchers run on the CPU

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from common import comfy_sdpa, save  # noqa: E402
from devkit.sampling_run import sampling_run  # noqa: E402
from sparge_attention.nodes import sparse_call  # noqa: E402
from sparge_attention.nodes.config import SpargeConfig  # noqa: E402
from sparge_attention.nodes.override import SpargeOverride  # noqa: E402
from sparge_attention.sparge_core import sparge_attention, torch_op  # noqa: E402
from sparge_attention.sparge_core.layout import merge_heads, split_heads  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402

H, D, B, GRID = 2, 64, 1, (2, 8, 8)  # tiny: the reference backend's compute stays out of the figures


def median_us(fn, n):
    for _ in range(max(10, n // 20)):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e6


def node_layer_us(preset, steps=12, blocks=30, skip=3):
    """Median time of the override's unmeasured calls, p90 of all calls (the measured ones)."""
    n = GRID[0] * GRID[1] * GRID[2]
    x = [torch.randn(B, n, H * D) for _ in range(3)]
    real, cache = sparse_call.run_sparse, {}

    def cached(*a, **kw):  # one real sparse call per kind (plain / with mask / with lse), then its result
        key = tuple(bool(v) for v in a[6:]) + tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = real(*a, **kw)
        return cache[key]

    def run():
        ov = SpargeOverride(SpargeConfig.from_widgets(preset=preset, min_tokens=64), node_id="host-layers")
        times = []

        def forward(x_, t, c_concat, c_crossattn, control, to):
            for _ in range(blocks):
                t0 = time.perf_counter()
                ov(comfy_sdpa, *x, heads=H, transformer_options=to)
                times.append(time.perf_counter() - t0)

        lat = torch.zeros(B, 16, GRID[0], GRID[1] * 2, GRID[2] * 2)
        sampling_run(ov, forward, SimpleNamespace(patch_size=(1, 2, 2)), lat, steps)
        return sorted(t * 1e6 for t in times[skip * blocks:])

    sparse_call.run_sparse = cached
    try:
        run()
        ts = run()
    finally:
        sparse_call.run_sparse = real
    return ts[len(ts) // 2], ts[int(len(ts) * 0.9)]


def api_triton_us(params, n):
    """sparge_attention's host time on the Triton path without its kernel launches."""
    import triton.runtime.interpreter as interpreter

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 1024, D, generator=g, dtype=torch.float16) for _ in range(3))
    call = lambda: sparge_attention(q, k, v, params, backend="triton", grid=(4, 16, 16), return_stats=True)  # noqa: E731
    call()  # compiles nothing (interpreter), but runs every kernel once
    real = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *a, **kw: None
    try:
        return median_us(call, n)
    finally:
        interpreter.InterpretedFunction.run = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = PRESETS[args.preset].params()
    q = torch.randn(B, H, 32, D)  # shorter than one query block: sparge_attention runs it dense
    x = torch.randn(B, 1024, H * D)
    node_med, node_p90 = node_layer_us(args.preset)
    api = median_us(lambda: sparge_attention(q, q, q, p, return_stats=True), args.calls)
    op = median_us(lambda: torch_op.call(q, q, q, p), args.calls)
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "preset": args.preset, "host_us": {
               "node layer (median call)": node_med, "node layer (p90: measured calls)": node_p90,
               "op call minus sparge_attention": op - api, "sparge_attention, dense at 32 tokens": api,
               "split_heads + merge_heads": median_us(lambda: merge_heads(split_heads(x, H)), args.calls),
               "sparge_attention, Triton path without launches": api_triton_us(p, args.calls // 4)}}
    print(f"host time per call (median, us) on the CPU, {args.preset}")
    for name, us in res["host_us"].items():
        print(f"  {name:<46} {us:8.1f}")
    print("saved", save(res, f"{res['date']}-cpu-host_layers"))


if __name__ == "__main__":
    main()
