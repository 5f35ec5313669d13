"""The sparse call replayed from a CUDA graph with its helpers on side streams (triton_call's
FORK_IN_GRAPHS: K's statistics and quantizer on one, V's cast on another, Q's quantizer and the
scoring on the caller's stream) against the same call captured in one stream, in one process:
both graphs captured from the same inputs, their outputs compared bit for bit, then replayed in
alternating rounds (GPU time, no launches), next to SDPA-cuDNN on the same inputs.

    python bench/fork_cost.py [--shapes wan480_17f,wan480,hunyuan544] [--preset Balanced] [--rounds 15]
"""
import argparse
import datetime
import statistics

import torch

from common import SHAPES, bench_ms, card_name, realistic_text_tokens, save, sdpa_cudnn
from devkit.realistic_inputs import make_video_qkv
from sparge_attention.sparge_core import sparge_attention, triton_call
from sparge_attention.sparge_core.presets import PRESETS


def capture(fn, fork: bool):
    """fn captured in a graph with FORK_IN_GRAPHS = fork (warmed up on a side stream first)."""
    triton_call.FORK_IN_GRAPHS = fork
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    triton_call.FORK_IN_GRAPHS = True
    return g, out


def replay_ms(g, n: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480_17f,wan480,hunyuan544")
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    params = PRESETS[args.preset].params()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "date": datetime.date.today().isoformat(), "shapes": {}}
    print(f"{'shape':12s} {'cuDNN ms':>9s} {'one stream':>11s} {'forked':>9s} {'ratio':>7s} "
          f"{'x cuDNN one':>12s} {'x cuDNN forked':>15s}  same output")
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, batch=B, n_text=realistic_text_tokens(name),
                                    seed=0, device=torch.device("cuda"))
        fn = lambda: sparge_attention(q, k, v, params, grid=grid)  # noqa: E731
        want = fn()
        (g0, o0), (g1, o1) = capture(fn, False), capture(fn, True)
        g0.replay()
        g1.replay()
        torch.cuda.synchronize()
        same = torch.equal(o0, want) and torch.equal(o1, want)
        t_c = bench_ms(lambda: sdpa_cudnn(q, k, v))
        n = max(3, int(20 / max(t_c * 0.1, 0.05)))  # ~20 ms of replays a round
        t0, t1 = [], []
        for r in range(args.rounds):  # alternating which goes first
            for g, ts in ((g0, t0), (g1, t1))[::1 if r % 2 == 0 else -1]:
                ts.append(replay_ms(g, n))
        m0, m1 = statistics.median(t0), statistics.median(t1)
        res["shapes"][name] = {"cudnn_ms": t_c, "one_stream_ms": m0, "forked_ms": m1, "ratio": m1 / m0,
                               "one_stream_runs": t0, "forked_runs": t1, "same_output": same}
        print(f"{name:12s} {t_c:9.3f} {m0:11.4f} {m1:9.4f} {m1 / m0:7.3f} {m0 / t_c:12.4f} {m1 / t_c:15.4f}  {same}")
        del q, k, v, g0, g1, o0, o1
        torch.cuda.empty_cache()
    print("saved", save(res, f"{res['date']}-{card_name()}-fork_cost"))


if __name__ == "__main__":
    main()
