"""One error-target measurement (sparge_core.adapt.sampled_error, 256 sampled rows) of this tree
against another's, in one process (issue 14: a measured call's host time): GPU time (CUDA events,
alternating pairs), host time (host_overhead.queued_us: calls queued with no sync between them
behind a long sleep kernel, as in a model; a call timed after a sync pays under cudaMallocAsync
for mapping again what the sync gave back), and the two builds' sums on the same rows against
float64 exact attention. Also SDPA-cuDNN of the whole call for scale.

    python bench/measure_ab.py --before ../.carry/before [--tokens 7800 32760]
"""
import argparse
import datetime
import importlib
from pathlib import Path

import torch

from common import card_name, paired_ratio, save, sdpa_cudnn
from host_ab import load_tree
from host_overhead import B, D, H, queued_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[7800, 32760])
    args = ap.parse_args()
    load_tree(Path(args.before).resolve(), "sparge_before")
    fns = {name: importlib.import_module(f"{pkg}.sparge_core.adapt").sampled_error
           for name, pkg in (("after", "sparge_attention"), ("before", "sparge_before"))}
    g = torch.Generator(device="cuda").manual_seed(0)
    res = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "rows": 256, "shapes": {}}
    for n in args.tokens:
        # ComfyUI's (B, N, H*D) activations as (B, H, N, D) views; attention with some structure
        q, k, v = (torch.randn(B, n, H * D, device="cuda", dtype=torch.bfloat16, generator=g).view(B, n, H, D)
                   .transpose(1, 2) for _ in range(3))
        k = k * 2
        out = (sdpa_cudnn(q, k, v) + 0.03 * torch.randn(q.shape, device="cuda", generator=g)).to(q.dtype)
        rows = torch.randint(0, n, (256,), device="cuda", generator=g)
        exact = torch.softmax(q.double()[:, :, rows] @ k.double().transpose(-1, -2) * D ** -0.5, -1) @ v.double()
        exact = exact.to(q.dtype).double()
        o = out.double()[:, :, rows]
        want = torch.stack([(o - exact).abs().sum((0, 2, 3)), exact.abs().sum((0, 2, 3))])
        row = {}
        for name, fn in fns.items():
            got = fn(q, k, v, out, rows)
            err = ((got[0] / got[1]) / (want[0] / want[1]) - 1).abs().max().item()
            row[name] = {"rel_l1_measured": (got[0].sum() / got[1].sum()).item(),
                         "worst_head_rel_diff_of_rel_l1": err}
        row["rel_l1_float64"] = (want[0].sum() / want[1].sum()).item()
        ratio, ms_after, ms_before = paired_ratio(lambda: fns["after"](q, k, v, out, rows),
                                                  lambda: fns["before"](q, k, v, out, rows))
        _, _, sdpa_ms = paired_ratio(lambda: fns["after"](q, k, v, out, rows), lambda: sdpa_cudnn(q, k, v))
        row["gpu_ms"] = {"after": ms_after, "before": ms_before, "after/before": ratio, "sdpa_cudnn": sdpa_ms}
        row["host_us_queued"] = {name: queued_us(lambda: fn(q, k, v, out, rows))[0] for name, fn in fns.items()}
        row["host_us_queued"]["sdpa_cudnn"] = queued_us(lambda: sdpa_cudnn(q, k, v))[0]
        res["shapes"][str(n)] = row
        print(f"{n:>6} tokens  GPU ms after {ms_after:.3f} before {ms_before:.3f} (x{ratio:.3f}; SDPA whole call "
              f"{sdpa_ms:.3f})  host us queued " + ", ".join(f"{k} {v:.0f}" for k, v in row["host_us_queued"].items())
              + f"  rel-L1 measured after {row['after']['rel_l1_measured']:.5f} before "
              f"{row['before']['rel_l1_measured']:.5f} float64 {row['rel_l1_float64']:.5f}; worst head's "
              f"rel-L1 off by {row['after']['worst_head_rel_diff_of_rel_l1']:.2e} / "
              f"{row['before']['worst_head_rel_diff_of_rel_l1']:.2e}")
    print("saved", save(res, f"{res['date']}-{card_name()}-measure_ab"))


if __name__ == "__main__":
    main()
