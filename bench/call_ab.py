"""The whole sparse call of this checkout against another tree's, in one process on one GPU (first
used for v66, PDL between a call's kernels: bench/NOTES.md).

Loads this checkout as `sparge_attention` and the other tree as `sparge_before` (as bench/host_ab.py
does), then per shape, at a preset, on the realistic inputs:
  equal      both builds' outputs compared bit for bit, launched and through CUDA graphs;
  node       the call as the node runs it (a CallGraphs: Wan's shapes replay a graph of the call's
             kernels, HunyuanVideo 544p is over its byte budget and launches them);
  launched   the call launched kernel by kernel (no graphs);
each timed paired with SDPA-cuDNN (common.paired_ratio, as the goals are), the builds alternating
over rounds so that both see the GPU's same clocks; the median of the rounds is reported.

    python bench/call_ab.py --before ../.carry/before [--shapes wan480_17f,wan480,hunyuan544] [--rounds 5]
"""
import argparse
import datetime
import importlib
import statistics
from pathlib import Path

import torch

from common import SHAPES, card_name, paired_ratio, realistic_text_tokens, save, sdpa_cudnn
from devkit.pack import load_pack
from devkit.realistic_inputs import make_video_qkv


def build(pkg: str) -> dict:
    core = importlib.import_module(f"{pkg}.sparge_core")
    return dict(api=core.sparge_attention, presets=importlib.import_module(f"{pkg}.sparge_core.presets").PRESETS,
                graphs=importlib.import_module(f"{pkg}.sparge_core.call_graphs").CallGraphs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the other tree's root (its __init__.py)")
    ap.add_argument("--shapes", default="wan480_17f,wan480,hunyuan544")
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    load_pack("sparge_before", Path(args.before).resolve())
    builds = {"after": build("sparge_attention"), "before": build("sparge_before")}
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "date": datetime.date.today().isoformat(), "before": args.before, "shapes": {}}
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, batch=B, n_text=realistic_text_tokens(name),
                                    seed=0, device=torch.device("cuda"))
        cudnn = lambda: sdpa_cudnn(q, k, v)  # noqa: E731
        calls, outs, cgs = {}, {}, {}
        for tag, b in builds.items():
            p = b["presets"][args.preset].params()
            cg = cgs[tag] = b["graphs"]()
            calls[(tag, "node")] = (lambda b=b, p=p, cg=cg: b["api"](q, k, v, p, grid=grid, graphs=cg))
            calls[(tag, "launched")] = (lambda b=b, p=p: b["api"](q, k, v, p, grid=grid))
            for path in ("node", "launched"):
                for _ in range(3):  # a CallGraphs captures at a key's second sighting
                    out = calls[(tag, path)]()
                outs[(tag, path)] = out.clone()
        equal = {path: bool(torch.equal(outs[("after", path)], outs[("before", path)])) for path in ("node", "launched")}
        rows = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, fn in calls.items():
                x, t, t_c = paired_ratio(fn, cudnn)
                rows[key].append((x, t, t_c))
        r = res["shapes"][name] = {"shape": [B, H, q.shape[2], D], "equal": equal}
        for tag, cg in cgs.items():  # what the timed calls replayed, then the graphs' pool given back
            r[f"graphs_{tag}"] = cg.summary()
            cg.release()
        print(f"\n{name} {tuple(q.shape)} {args.preset}: outputs equal bit for bit {equal}")
        for path in ("node", "launched"):
            med = {}
            for tag in builds:
                xs = [x for x, _, _ in rows[(tag, path)]]
                ts = [t for _, t, _ in rows[(tag, path)]]
                med[tag] = (statistics.median(xs), statistics.median(ts))
                r[f"{path}_{tag}"] = {"x_cudnn": med[tag][0], "ms": med[tag][1], "rounds_x": xs, "rounds_ms": ts,
                                      "cudnn_ms": [c for _, _, c in rows[(tag, path)]]}
            # the paired ratios' quotient is the fairer one: each call's ms moves with the clocks of
            # its pairs, which cuDNN's time beside it shows
            ratio, xratio = med["after"][1] / med["before"][1], med["after"][0] / med["before"][0]
            r[f"{path}_after_over_before"] = ratio
            r[f"{path}_after_over_before_paired"] = xratio
            print(f"  {path:9s} after {med['after'][0]:.4f}x cuDNN ({med['after'][1]:.4f} ms)   before "
                  f"{med['before'][0]:.4f}x ({med['before'][1]:.4f} ms)   after / before {xratio:.3f} paired, "
                  f"{ratio:.3f} in ms")
        del q, k, v, calls, outs
        torch.cuda.empty_cache()
    print("saved", save(res, f"{res['date']}-{card_name()}-call_ab"))


if __name__ == "__main__":
    main()
