"""End to end with the error targets: whole sampling runs of ComfyUI 0.3.75's real WanModel (random
bf16 weights, batch 2) driven through the Sparge Attention node's model wrappers the way ComfyUI
calls them (OUTER_SAMPLE around the run, APPLY_MODEL around each forward), for each preset with its
adaptation, and for today's fixed preset thresholds (Custom share mode, no target; measured the
same way but never moved) side by side, and those fixed thresholds once more as a user runs them
(nothing measures a setting without a target: its speed without the bench's measurement, its error
the measured row's, whose masks it shares).

    python bench/e2e_adapt.py [--model wan13b_480] [--steps 30] [--presets Quality,Balanced,Fast,Turbo]

Reports per preset: seconds per step over the run, speed-up against ComfyUI's default attention,
sparsity, the readout's measured_rel_l1 against target_rel_l1, and the adaptation's share of the
run: measured calls x the GPU time of one measurement (sampled_error at this shape, timed alone)
plus the node's first-block probe (PROBE_CALLS sparse calls at most), over the run's time.
Random weights make attention nearly uniform (see bench/e2e_wan.py): the errors show how the
targets move the thresholds on such a model, not image quality.
"""
import argparse
import datetime
import sys
import time

import torch

from common import ROOT, bench_ms, card_name, save
from devkit.sampling_run import sampling_run
from e2e_wan import step_time, wan_inputs

sys.path.insert(0, str(ROOT / ".comfyui" / "ComfyUI"))


def timed_run(ov, dm, x, t, ctx, steps):
    """One sampling run of `steps` forwards through the override's wrappers; seconds."""
    def forward(x_, t_, c_concat, c_crossattn, control, to):
        return dm(x_, t_, c_crossattn, transformer_options=to)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        sampling_run(ov, forward, dm, x, steps, t=t, context=ctx)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measurement_ms(heads, N, D, dev):
    """GPU time of one measured call's extra work at this shape (sampled_error, default rows)."""
    from sparge_attention.sparge_core.adapt import DEFAULT_ROWS, sample_rows, sampled_error

    q, k, v, o = (torch.randn(2, heads, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    g = torch.Generator(device=dev).manual_seed(0)
    ms = bench_ms(lambda: sampled_error(q, k, v, o, sample_rows(N, DEFAULT_ROWS, dev, g)))
    del q, k, v, o
    return ms


def block_states(ov, readout):
    """Per block: the readout's per-head errors over the run (fixed thresholds too), and for an
    adapted block at the run's end its minshare and head factors, the pooled and per-head error of
    the last update, and the bracket ends."""
    per_layer = (readout.get("adaptation") or {}).get("per_layer", {})
    out = {b: {"run_rel_l1": e.get("rel_l1")} for b, e in per_layer.items()}
    for obs in ov.observers:
        for b, c in sorted(getattr(obs, "controllers", {}).items()):
            safe, over = c.brackets()
            out.setdefault(str(b), {}).update({
                "thresholds": [round(float(x), 4) for x in c.thresholds.tolist()],
                "factors": [round(f, 4) for f in c.factors], "block_error": c.block_error, "updates": c.updates,
                "last_error": [round(float(x), 5) for x in c.last_error.tolist()], "safe": safe, "over": over})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan13b_480")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--presets", default="Quality,Balanced,Fast,Turbo")
    ap.add_argument("--trace", action="store_true", help="save each block's controller state at the run's end")
    args = ap.parse_args()
    from sparge_attention.nodes import routes
    from sparge_attention.nodes.adapt import PROBE_CALLS, Adaptation
    from sparge_attention.nodes.config import SpargeConfig
    from sparge_attention.nodes.override import SpargeOverride
    from sparge_attention.sparge_core.presets import PRESETS

    dev = torch.device("cuda")
    dm, x, t, ctx, heads, D, N, note = wan_inputs(args.model, dev)
    t_default = step_time(dm, x, t, ctx, dict, 3)
    t_meas = measurement_ms(heads, N, D, dev)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "model": args.model, "layers": note, "tokens": N, "steps": args.steps, "default_s_per_step": t_default,
           "measurement_ms": t_meas, "rows": []}
    print(f"{args.model} ({note}, {N} tokens, batch 2), {args.steps} steps: default {t_default:.3f} s/step; "
          f"one measurement {t_meas:.3f} ms")

    def settings(name):
        """(label, config, measured by the bench): the preset; its starting thresholds fixed, measured the
        same way but never moved (measure only: the row shows their error); and that fixed setting as a
        user runs it (Custom share mode, no target: nothing measures it; the same masks as the row before,
        whose error it has)."""
        p = PRESETS[name]
        fixed = SpargeConfig.from_widgets(preset="Custom", mode="share", minshare=p.minshare, simthreshd1=-1.0,
                                          fill_skipped=p.fill_skipped, min_tokens=1024)
        return ((name, SpargeConfig.from_widgets(preset=name, min_tokens=1024), False), (f"{name} fixed", fixed, True),
                (f"{name} fixed, unmeasured", fixed, False))

    # every kernel variant each timed setting launches, compiled outside the timed runs (on a fresh
    # machine a 17-frame run read 0.81x where a warm cache read 1.05x, bench/NOTES.md v27)
    for name in args.presets.split(","):
        for _, cfg, _ in settings(name)[:2]:
            timed_run(SpargeOverride(cfg), dm, x, t, ctx, 3)
    print(f"{'setting':<20} {'s/step':>7} {'speed-up':>8} {'sparsity':>8} {'measured':>9} {'target':>7} "
          f"{'calls':>6} {'adapt share':>11}")
    for name in args.presets.split(","):
        p = PRESETS[name]
        for label, cfg, measured in settings(name):
            node = f"e2e-{label}"
            watch = (Adaptation(p.target_rel_l1, measure_only=True),) if measured else ()
            ov = SpargeOverride(cfg, node_id=node, observers=watch)
            secs = timed_run(ov, dm, x, t, ctx, args.steps)
            r = routes.last_readouts()[node]
            calls = (r.get("adaptation") or {}).get("measured_calls", 0)
            per_call_ms = 1000 * secs / max(1, r["sparse_calls"])
            share = (calls * t_meas + (PROBE_CALLS * per_call_ms if cfg.target_rel_l1 else 0.0)) / (1000 * secs)
            row = {"setting": label, "s_per_step": secs / args.steps, "speedup": args.steps * t_default / secs,
                   "sparsity": r["sparsity"], "measured_rel_l1": r.get("measured_rel_l1"),
                   "target_rel_l1": r.get("target_rel_l1"), "measured_calls": calls, "adaptation_share": share,
                   "graphs": ov.last_graphs}
            if args.trace:
                row["blocks"] = block_states(ov, r)
                row["per_step_sparsity"] = r.get("per_step_sparsity")
                errs = {b: [x for x in e["run_rel_l1"] or [] if x is not None] for b, e in row["blocks"].items()}
                b = max(errs, key=lambda b: sum(errs[b]) / max(1, len(errs[b])))
                print(f"  worst block {b}: head-mean rel-L1 {sum(errs[b]) / len(errs[b]):.4f}, "
                      f"worst head {max(errs[b]):.4f}")
            res["rows"].append(row)
            meas = "-" if row["measured_rel_l1"] is None else f"{row['measured_rel_l1']:.4f}"
            tgt = "-" if row["target_rel_l1"] is None else f"{row['target_rel_l1']:.3f}"
            print(f"{label:<20} {row['s_per_step']:7.3f} {row['speedup']:8.2f} {row['sparsity']:8.3f} {meas:>9} "
                  f"{tgt:>7} {calls:6d} {100 * share:10.2f}%   graphs {ov.last_graphs}")
    print("saved", save(res, f"{res['date']}-{card_name()}-e2e_adapt"))


if __name__ == "__main__":
    main()
