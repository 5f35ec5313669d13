"""Where the GPU time of one whole sparse call goes, kernel by kernel, on the realistic inputs at a
preset: torch.profiler's CUDA kernels of a few calls (per call) and their sum, next to the call
timed three ways: against SDPA-cuDNN in alternating pairs (as the goals are measured), alone back to
back (triton.testing.do_bench; cuDNN too), and replayed from a CUDA graph (GPU time, no launches).
Paired against alone is what running right after cuDNN does to the call (clocks, caches); alone
against the graph is launch time the GPU waits on.

    python bench/call_profile.py [--shapes wan480,hunyuan544,wan480_17f] [--preset Balanced] [--calls 5]
"""
import argparse
import datetime
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from common import SHAPES, bench_graph_ms, bench_ms, card_name, paired_ratio, realistic_text_tokens, save, sdpa_cudnn
from devkit.realistic_inputs import make_video_qkv
from sparge_attention.sparge_core import sparge_attention
from sparge_attention.sparge_core.presets import PRESETS


def kernel_times(fn, calls: int) -> dict:
    """name -> (launches per call, GPU us per call) of every CUDA kernel fn launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    acc = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        us = ev.self_cuda_time_total if us is None else us
        if us > 0:  # the kernels (CPU-side ops have no device time of their own)
            a = acc[ev.key[:70]]
            a[0] += ev.count
            a[1] += us
    return {n: (c / calls, us / calls) for n, (c, us) in acc.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544,wan480_17f")
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    params = PRESETS[args.preset].params()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "date": datetime.date.today().isoformat(), "shapes": {}}
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, batch=B, n_text=realistic_text_tokens(name),
                                    seed=0, device=torch.device("cuda"))
        call = lambda: sparge_attention(q, k, v, params, grid=grid)  # noqa: E731
        x, t, t_c = paired_ratio(call, lambda: sdpa_cudnn(q, k, v))
        t_alone, t_c_alone = bench_ms(call), bench_ms(lambda: sdpa_cudnn(q, k, v))
        t_graph = bench_graph_ms(call)  # GPU time alone: the call replayed from a CUDA graph
        kt = kernel_times(call, args.calls)
        total = sum(us for _, us in kt.values())
        res["shapes"][name] = {"call_ms": t, "cudnn_ms": t_c, "x_cudnn": x, "alone_ms": t_alone,
                               "cudnn_alone_ms": t_c_alone, "graph_ms": t_graph, "kernels_us": total,
                               "kernels": {n: {"per_call": c, "us": us} for n, (c, us) in kt.items()}}
        print(f"\n{name} {tuple(q.shape)} preset {args.preset}: call {t:.3f} ms = {x:.4f}x cuDNN ({t_c:.2f} ms) "
              f"paired, {t_alone:.3f} ms alone (cuDNN {t_c_alone:.2f}), {t_graph:.3f} ms from a graph; "
              f"kernels {total / 1e3:.3f} ms = {total / 1e3 / t_c:.4f}x")
        for n, (c, us) in sorted(kt.items(), key=lambda kv: -kv[1][1]):
            print(f"  {us:9.1f} us  {us / 1e3 / t_c:.4f}x  x{c:g}  {n}")
        del q, k, v
        torch.cuda.empty_cache()
    print("saved", save(res, f"{res['date']}-{card_name()}-call_profile"))


if __name__ == "__main__":
    main()
