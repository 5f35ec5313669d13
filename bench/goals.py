"""Issue 14's goals, each next to the newest figure measured for it, read from bench/results/*.json
(no GPU): the figure, its card, date and file, and whether it meets the goal.

A figure comes from the newest result file of its kind (the bench that measures it) whose name
ends in a plain version tag (`-v44`, `-v42b`) or none: the files of other trees timed beside
production (`-base-`, `-before-`, `-nocap-`, `-stride2-`...) are left out. Newest: by date, then
by version. Which bench writes each kind, and the command, is in bench/results/README.md.

    python bench/goals.py [--card H100] [--results bench/results] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})-([^-]+)-(.+)\.json$")  # date, card, kind[-tag]
TAG = re.compile(r"^v(\d+)([a-z]?)$")


def newest(results: Path, kind: str, card: str | None = None):
    """(path, date, card) of the newest file whose name is <date>-<card>-<kind>[-v<N>[a-z]].json, kind a
    regex, or None."""
    best = None
    for p in results.glob("*.json"):
        m = NAME.match(p.name)
        if not m or (card and m.group(2) != card):
            continue
        rest = re.fullmatch(rf"({kind})(?:-(.+))?", m.group(3))
        if not rest:
            continue
        tag = rest.group(2)
        t = TAG.match(tag) if tag else None
        if tag and not t:
            continue
        key = (m.group(1), int(t.group(1)) if t else -1, t.group(2) if t else "")
        if best is None or key > best[0]:
            best = (key, p, m.group(1), m.group(2))
    return None if best is None else best[1:]


def _fill_cost(d, shape):
    return next(r["x_cudnn"] for r in d["shapes"][shape]["rows"] if r["part"] == "prediction + quantization, fill")


def _at_target(d, shape):
    return d["shapes"][shape]["at_target"]["lse fill hilbert"]["x_cudnn"]


def _preset(d, shape, name):
    return next(r["x_cudnn"] for r in d["shapes"][shape]["rows"] if r["setting"] == f"preset {name}")


def _kernel(d, shape, density):
    """The production variant's mean over its rows at that density (kernel_variants times it twice):
    the paired ratio where the file has one (since 2026-12-06), else the ratio of the two timed alone.
    At the H100's power limit the kernel timed alone read 0.66-0.76 at density 1.0 from row to row
    (its energy ratio to cuDNN, 0.705, with clocks wandering), paired 0.74-0.76 (its cycle ratio,
    0.759: bench/power_draw.py)."""
    xs = [r.get("x_paired", r["x_cudnn"]) for r in d["shapes"][shape]["rows"]
          if r["density"] == density and r["variant"] in ("hopper", "hopper (again)")]
    return sum(xs) / len(xs)


def _host(d, tokens):
    return d["host_us"][str(tokens)]["override, mean, queued"][0]


def _e2e(d, setting):
    """The setting's speed-up, or None where the file has no such row (older files lack the unmeasured one)."""
    return next((r["speedup"] for r in d["rows"] if r["setting"] == setting), None)


def _memory(d, shape):
    s = d["shapes"][shape]
    return s["extra_bytes"]["node override (measured call)"] / s["qkv_bytes"]


# (goal, target, "<=" or ">=", kind of result file, figure from its JSON, unit)
GOALS = [
    ("prediction + quantization, Wan 480p", 0.02, "<=", "fill_cost", lambda d: _fill_cost(d, "wan480"), "x cuDNN"),
    ("prediction + quantization, HunyuanVideo 544p", 0.015, "<=", "fill_cost",
     lambda d: _fill_cost(d, "hunyuan544"), "x cuDNN"),
    ("whole call at rel-L1 0.05, Wan 480p", 0.06, "<=", "realistic", lambda d: _at_target(d, "wan480"), "x cuDNN"),
    ("whole call at rel-L1 0.05, HunyuanVideo 544p + 256 text", 0.05, "<=", "realistic",
     lambda d: _at_target(d, "hunyuan544"), "x cuDNN"),
    ("Turbo / Fast, Wan 480p (Turbo strictly faster)", 1.0, "<", "realistic",
     lambda d: _preset(d, "wan480", "Turbo") / _preset(d, "wan480", "Fast"), "ratio"),
    ("Turbo / Fast, HunyuanVideo 544p", 1.0, "<", "realistic",
     lambda d: _preset(d, "hunyuan544", "Turbo") / _preset(d, "hunyuan544", "Fast"), "ratio"),
    ("host time per call through the node, 7,800 tokens (mean, queued)", 100.0, "<=", "host",
     lambda d: _host(d, 7800), "us"),
    ("host time per call through the node, 32,760 tokens", 100.0, "<=", "host", lambda d: _host(d, 32760), "us"),
    *[(f"kernel at a mask, density {dens}, {shape}", goal, "<=", "variants",
       (lambda d, s=shape, x=dens: _kernel(d, s, x)), "x cuDNN")
      for shape in ("wan480", "hunyuan544") for dens, goal in ((1.0, 0.65), (0.5, 0.36), (0.25, 0.19), (0.1, 0.09))],
    ("e2e Wan 1.3B 480p, Balanced fixed (realistic rel-L1 0.046)", 2.35, ">=", "e2e_adapt-30-async",
     lambda d: _e2e(d, "Balanced fixed"), "x"),
    ("e2e Wan 1.3B 480p, Balanced fixed as run (no measurement)", 2.35, ">=", "e2e_adapt-30-async",
     lambda d: _e2e(d, "Balanced fixed, unmeasured"), "x"),
    ("e2e Wan 1.3B 480p, Balanced adaptive", 2.35, ">=", "e2e_adapt-30-async", lambda d: _e2e(d, "Balanced"), "x"),
    ("e2e Wan 14B 720p (8 layers), Balanced fixed", 2.9, ">=", r"e2e_adapt-14b-\d+-async",
     lambda d: _e2e(d, "Balanced fixed"), "x"),
    ("e2e Wan 14B 720p (8 layers), Balanced adaptive", 2.9, ">=", r"e2e_adapt-14b-\d+-async",
     lambda d: _e2e(d, "Balanced"), "x"),
    ("extra memory of one call, Wan 14B 720p, batch 2", 1.0, "<=", "memory", lambda d: _memory(d, "wan720"),
     "x (q+k+v)"),
    ("extra memory of one call, HunyuanVideo 720p, batch 2", 1.0, "<=", "memory",
     lambda d: _memory(d, "hunyuan720"), "x (q+k+v)"),
]
MEETS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "<": lambda v, t: v < t}


def goal_rows(results: Path, card: str | None = None) -> list[dict]:
    rows = []
    for goal, target, op, kind, figure, unit in GOALS:
        found = newest(results, kind, card)
        row = {"goal": goal, "target": f"{op} {target:g}", "unit": unit}
        if found is None:
            rows.append({**row, "figure": None, "met": None, "file": None})
            continue
        path, date, card_of = found
        value = figure(json.loads(path.read_text()))
        rows.append({**row, "figure": value, "met": None if value is None else MEETS[op](value, target),
                     "file": path.name, "date": date, "card": card_of})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--card", default=None, help="only files of this card (as in the file names: H100, H200)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = goal_rows(Path(args.results), args.card)
    print(f"{'goal':62s} {'target':>9s} {'figure':>9s} {'':10s} {'met':5s} file")
    for r in rows:
        fig = "-" if r["figure"] is None else f"{r['figure']:.4g}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"{r['goal']:62s} {r['target']:>9s} {fig:>9s} {r['unit']:10s} {met:5s} {r['file'] or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
