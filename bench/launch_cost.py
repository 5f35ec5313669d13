"""What one Triton launch and one small torch op cost on the host (issue 14, host time per call).

Captures the kernel launches of one `sparge_attention` call (Balanced, Hilbert grid) and times,
per launch and on the host only (each timed call starts on an idle queue):
  run      the launch as the pack made it before v23 (bench/NOTES.md): `kernel[grid](*args, **kwargs)`, i.e.
           Triton's JITFunction.run (binder, cache key, checks, launcher)
  binder   Triton's argument binder alone (the exact specialization of each argument)
  direct   the compiled kernel's launcher alone, with the bound arguments ready
  fast     the pack's launch path (kernels/launch.py): binder, a dict lookup, the launcher
then the small torch ops a call makes (empty, zeros, sum, to), a count of the aten ops one call
dispatches, and a cProfile listing of the API's calls (own time).

    python bench/launch_cost.py [--tokens 7800]
"""
import argparse
import cProfile
import datetime
import io
import pstats

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import card_name, save
from devkit.launches import capture_launches
from host_overhead import GRIDS, B, D, H
from host_overhead import host_us as host_wall_cpu_us
from sparge_attention.sparge_core import sparge_attention
from sparge_attention.sparge_core.presets import PRESETS


def host_us(fn):
    """Median wall time of one call, each started on an idle GPU queue (host_overhead's timer)."""
    return host_wall_cpu_us(fn, n=200, warmup=10)[0]


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=7800)
    args = ap.parse_args()
    import triton  # noqa: F401

    n, grid = args.tokens, GRIDS[args.tokens]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    p = PRESETS["Balanced"].params()
    call = lambda: sparge_attention(q, k, v, p, grid=grid)  # noqa: E731
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "tokens": n, "api_us": host_us(call)}

    log = capture_launches(call)
    torch.cuda.synchronize()
    dev = torch.cuda.current_device()
    rows = []
    for name, kern, kgrid, a, kw in log:
        jf = kern.fn
        ck = jf[kgrid](*a, **kw)
        binder = jf.device_caches[dev][4]
        bound, _, _ = binder(*a, **kw)
        vals = tuple(bound.values())
        gx = tuple(kgrid) + (1, 1)
        stream = torch._C._cuda_getCurrentRawStream(dev)
        row = {"kernel": name, "args": len(vals),
               "run": host_us(lambda: jf[kgrid](*a, **kw)),
               "binder": host_us(lambda: binder(*a, **kw)),
               "direct": host_us(lambda: ck.run(gx[0], gx[1], gx[2], stream, ck.function, ck.packed_metadata,
                                                None, None, None, *vals))}
        row["fast"] = host_us(lambda: kern[kgrid](*a, **kw))
        rows.append(row)
    res["launches"] = rows
    x = torch.empty(4096, device="cuda")
    res["ops_us"] = {
        "torch.empty": host_us(lambda: torch.empty(B, H, 64, device="cuda")),
        "torch.zeros": host_us(lambda: torch.zeros(B, H, 64, device="cuda")),
        "tensor.sum": host_us(lambda: x.sum()),
        "tensor.to(int8)": host_us(lambda: x.to(torch.int8)),
        "view+narrow": host_us(lambda: x.view(64, 64)[:, :32]),
        "current_device": host_us(lambda: torch.cuda.current_device()),
        "raw stream": host_us(lambda: torch._C._cuda_getCurrentRawStream(dev)),
    }
    with Ops() as ops:
        call()
    res["aten_ops_per_call"] = dict(sorted(ops.ops.items(), key=lambda kv: -kv[1]))
    print(f"host time per launch (median us), {res['card']}, triton {res['triton']}, {n} tokens; "
          f"API call {res['api_us']:.0f} us")
    print(f"  {'kernel':<24} {'args':>4} {'run':>7} {'binder':>7} {'direct':>7} {'fast':>7}")
    for r in rows:
        print(f"  {r['kernel']:<24} {r['args']:>4} {r['run']:7.1f} {r['binder']:7.1f} {r['direct']:7.1f} "
              f"{r.get('fast', float('nan')):7.1f}")
    print("  sums:", {c: round(sum(r.get(c, 0.0) for r in rows), 1) for c in ("run", "binder", "direct", "fast")})
    for name, us in res["ops_us"].items():
        print(f"  {name:<24} {us:7.1f} us")
    print(f"  aten ops per call: {sum(ops.ops.values())}", res["aten_ops_per_call"])
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        call()
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(30)
    print("\n".join(out.getvalue().splitlines()[:45]))
    print("saved", save(res, f"{res['date']}-{card_name()}-launch_cost"))


if __name__ == "__main__":
    main()
