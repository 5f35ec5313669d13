"""CPU study: does the error target (the node's per-block adaptation) follow an error that moves
over a denoising trajectory? bench/reuse_study.py found the Balanced threshold's error 4x its
target at the noisiest steps of a synthetic trajectory and on target at the last ones.

One transformer block's BlockController (sparge_core/adapt.py) is driven as nodes/adapt.py drives
it: measured on the run's first WARMUP_FORWARDS steps, then every MEASURE_EVERY steps, and on the
call right after a raise of its thresholds; each measurement is sampled_error on DEFAULT_ROWS
random rows (of the sampled query blocks), the update follows it. Per step: the whole and worst-head
rel-L1 against fp32 dense attention and the kept-block density, adaptive next to the fixed preset.
Reference backend, Hilbert order, the trajectory inputs of reuse_study.py.

    python bench/trajectory_adapt.py [--grid 21 30 52] [--sample-qblocks 8] [--preset Balanced] [--seeds 1]
"""
import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from reuse_study import errors, sigmas, trajectory_inputs  # noqa: E402
from sparge_attention.nodes.adapt import MEASURE_EVERY, WARMUP_FORWARDS  # noqa: E402
from sparge_attention.sparge_core.adapt import DEFAULT_ROWS, BlockController, sample_rows, sampled_error  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402
from sparge_attention.sparge_core.reference import dense_attention, sparse_attention_reference  # noqa: E402
from sparge_attention.sparge_core.reference_predict import predict_block_mask  # noqa: E402


def sparse(q, k, v, params, block_q, block_k):
    mask, bias = predict_block_mask(q, k, params, block_q, block_k, return_fill=True)
    return sparse_attention_reference(q, k, v, mask, params, block_q, block_k, fill=bias)[0], mask.float().mean().item()


def run(seed, args, preset, log):
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    ctrl = BlockController(preset.target_rel_l1, preset.threshold, args.heads)
    gen = torch.Generator().manual_seed(seed)
    verify, rows = False, []
    for i, sigma in enumerate(sigmas(args.steps, args.shift)):
        t0 = time.time()
        q, k, v = trajectory_inputs(seed, tuple(args.grid), args.heads, args.head_dim, sigma, args.sample_qblocks,
                                    block_q)
        truth = dense_attention(q, k, v)
        used = ctrl.thresholds.clone()
        out, dens = sparse(q, k, v, preset.params(minshare=used), block_q, block_k)
        fixed, dens_f = sparse(q, k, v, preset.params(), block_q, block_k)
        measured = i < WARMUP_FORWARDS or i % MEASURE_EVERY == 0 or verify
        if measured:
            ctrl.update(sampled_error(q, k, v, out, sample_rows(q.shape[2], DEFAULT_ROWS, q.device, gen)))
            verify = bool((ctrl.thresholds > used).any())
        row = {"step": i, "sigma": sigma, "measured": measured, "minshare_mean": used.mean().item(),
               "adaptive": errors(out, truth) + (dens,), "fixed": errors(fixed, truth) + (dens_f,)}
        rows.append(row)
        a, f = row["adaptive"], row["fixed"]
        log(f"  step {i:2d} sigma {sigma:.3f} {'M' if measured else ' '} minshare {row['minshare_mean']:6.3f}"
            f"  adaptive {a[0]:.4f}/{a[1]:.4f} d {a[2]:.3f}   fixed {f[0]:.4f}/{f[1]:.4f} d {f[2]:.3f}"
            f"  ({time.time() - t0:.1f} s)")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--seeds", type=int, nargs="+", default=(1,))
    ap.add_argument("--sample-qblocks", type=int, default=8)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    preset = PRESETS[args.preset]
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    res = {"date": datetime.date.today().isoformat(), **{k: v for k, v in vars(args).items() if k != "seeds"},
           "target": preset.target_rel_l1, "measure_every": MEASURE_EVERY, "rows": DEFAULT_ROWS, "seeds": {}}
    for seed in args.seeds:
        log(f"seed {seed}: grid {tuple(args.grid)}, {args.preset} (target {preset.target_rel_l1}), rel-L1 whole/worst"
            f" head, density; M = a measured step")
        rows = run(seed, args, preset, log)
        mean = lambda key, j: sum(r[key][j] for r in rows) / len(rows)  # noqa: E731
        over = lambda key: sum(r[key][0] > 1.25 * preset.target_rel_l1 for r in rows)  # noqa: E731
        summary = {"adaptive_whole": mean("adaptive", 0), "fixed_whole": mean("fixed", 0),
                   "adaptive_worst_head": mean("adaptive", 1), "fixed_worst_head": mean("fixed", 1),
                   "adaptive_density": mean("adaptive", 2), "fixed_density": mean("fixed", 2),
                   "adaptive_steps_over_1.25x": over("adaptive"), "fixed_steps_over_1.25x": over("fixed")}
        res["seeds"][seed] = {"rows": rows, "summary": summary}
        log(f"  mean over the run: whole {summary['fixed_whole']:.4f} fixed -> {summary['adaptive_whole']:.4f}"
            " adaptive,"
            f" worst head {summary['fixed_worst_head']:.4f} -> {summary['adaptive_worst_head']:.4f}, density"
            f" {summary['fixed_density']:.3f} -> {summary['adaptive_density']:.3f}; steps above 1.25x the target"
            f" {summary['fixed_steps_over_1.25x']} -> {summary['adaptive_steps_over_1.25x']} of {len(rows)}")
    path = common.save(res, f"{res['date']}-cpu-trajectory_adapt-{args.preset}-grid{'x'.join(map(str, args.grid))}")
    path.with_suffix(".log").write_text("\n".join(lines) + "\n")
    print("saved", path)


if __name__ == "__main__":
    main()
