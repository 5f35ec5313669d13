"""Presets as error targets on attention they were not tuned on (issue 13).

Per regime (devkit/realistic_inputs.py REGIMES; batch 1, 12 heads of 128 dims) and preset,
side by side:
  fixed:    today's preset, one minshare for every head;
  adaptive: the online adaptation of sparge_core/adapt.py, simulated as a sampling run on fixed
            inputs: S steps, each a sparse call with the controller's per-head thresholds, a
            measurement on R sampled query rows against exact attention, and an update; the
            thresholds after the last update are then measured like the fixed preset.
Each: whole-output and worst-head rel-L1 against fp32 dense attention, sparsity, and the time
of the whole call as a ratio to SDPA-cuDNN (paired, same run). Plus the measurement's own cost
(sampled_error vs the sparse call), and PASS/MISS per goal of the issue. One more row, on the
tuning regime: time at equal error (rel-L1 0.05), adaptive vs the one minshare bisected to it.

    python bench/robustness.py [--regimes tuned,content,...] [--presets Quality,...] [--steps 8] [--rows 256]
"""
import argparse
import datetime
import math

import torch

from common import card_name, paired_ratio, save, sdpa_cudnn
from devkit.metrics import rel_l1
from devkit.realistic_inputs import REGIMES, make_regime_qkv
from realistic_bench import fp32_dense
from sparge_attention.sparge_core import sparge_attention
from sparge_attention.sparge_core.adapt import DEFAULT_ROWS, BlockController, sample_rows, sampled_error
from sparge_attention.sparge_core.presets import PRESETS

HEADS, HEAD_DIM = 12, 128
BLOCK_K = 128  # key block of the kernels: each query block keeps at least one, which caps sparsity
# the goals
WHOLE_TOL = 0.25  # whole-output rel-L1 within +-25% of the target
WORST_MAX = 2.0  # worst head at most 2x the target
SLOWER_MAX = 1.10  # at most 10% slower than today's preset where today's meets the target
FASTER_MIN = 1.5  # at least 1.5x faster where today's lands below half its target
EQ_TARGET, EQ_MAX = 0.05, 1.05  # time at rel-L1 0.05 at most 5% above the fixed minshare's
EQ_PRESET = "Balanced"  # the adaptive run at EQ_TARGET starts from this preset's minshare

DESCRIBE = {
    "tuned": "the presets' own tuning inputs: default head mix, Wan 480p",
    "content": "content/position-matching heads only (spatial, local, temporal)",
    "sink": "sink-heavy: 8 of 12 heads with sink keys",
    "uniform": "near-uniform: random q/k of std 0.7 (what random weights give)",
    "peaked": "very peaked: local heads, q x3",
    "text256": "joint attention, 256 text tokens after the video",
    "text512": "joint attention, 512 text tokens after the video",
    "wan720": "default head mix, Wan 720p (21, 45, 80)",
}


def measure(q, k, v, truth, params, grid, cudnn, budget_ms):
    out, st = sparge_attention(q, k, v, params, grid=grid, return_stats=True)
    per_head = rel_l1(out, truth, dims=(0, 2, 3))
    e = rel_l1(out, truth)
    del out
    x, ms, _ = paired_ratio(lambda: sparge_attention(q, k, v, params, grid=grid), cudnn, budget_ms=budget_ms)
    return {"rel_l1": e, "worst_head": per_head.max().item(), "per_head": per_head.tolist(),
            "sparsity": st.sparsity, "x_cudnn": x, "ms": ms}


def adapt(q, k, v, truth, preset, target, init, grid, steps, rows, seed):
    """The controller after `steps` sampled measurements and updates; the trace per step (true
    and sampled rel-L1, the thresholds the step ran with)."""
    H, N = q.shape[1], q.shape[2]
    ctrl = BlockController(target, init, H)
    gen = torch.Generator(device=q.device).manual_seed(seed)
    trace = []
    for _ in range(steps):
        used = ctrl.thresholds.clone()
        out = sparge_attention(q, k, v, preset.params(minshare=used), grid=grid)  # fresh SpargeParams each step
        sums = sampled_error(q, k, v, out, sample_rows(N, rows, q.device, gen)).cpu()
        trace.append({"rel_l1": rel_l1(out, truth), "sampled_rel_l1": (sums[0].sum() / sums[1].sum()).item(),
                      "minshare": used.tolist()})
        del out
        ctrl.update(sums)
    return ctrl, trace


def measurement_cost(q, k, v, params, grid, rows, budget_ms):
    """sampled_error alone against the sparse call it measures (paired)."""
    out = sparge_attention(q, k, v, params, grid=grid)
    r = sample_rows(q.shape[2], rows, q.device, torch.Generator(device=q.device).manual_seed(1))
    x, ms, sparse_ms = paired_ratio(lambda: sampled_error(q, k, v, out, r),
                                    lambda: sparge_attention(q, k, v, params, grid=grid), budget_ms=budget_ms)
    return {"x_sparse": x, "ms": ms, "sparse_ms": sparse_ms}


def goals(target, fixed, ad, max_sparsity):
    """PASS / MISS / None (goal does not apply) per goal; 'saturated' when the adaptive run skips
    everything it can and is still below the target (nothing left to trade)."""
    sat = ad["rel_l1"] < target and ad["sparsity"] >= max_sparsity - 1e-3
    g = {"whole": abs(ad["rel_l1"] / target - 1) <= WHOLE_TOL, "worst": ad["worst_head"] <= WORST_MAX * target,
         "speed": None, "speed_rule": None, "saturated": sat}
    if abs(fixed["rel_l1"] / target - 1) <= WHOLE_TOL:
        g["speed"], g["speed_rule"] = ad["x_cudnn"] <= SLOWER_MAX * fixed["x_cudnn"], f"<= {SLOWER_MAX}x fixed"
    elif fixed["rel_l1"] < target / 2 and fixed["sparsity"] >= max_sparsity - 1e-3:
        g["speed_rule"] = "fixed already skips all it can"  # nothing left to gain: the goal cannot apply
    elif fixed["rel_l1"] < target / 2:
        g["speed"], g["speed_rule"] = fixed["x_cudnn"] / ad["x_cudnn"] >= FASTER_MIN, f">= {FASTER_MIN}x faster"
    return g


def _pm(ok):
    return "-" if ok is None else ("PASS" if ok else "MISS")


def bisect_minshare(q, k, v, truth, grid, target, lo=0.05, hi=48.0, iters=12):
    """The one minshare (every head) whose rel-L1 is `target` on these inputs (geometric
    bisection; error grows with minshare), and its error."""
    def err(m):
        return rel_l1(sparge_attention(q, k, v, PRESETS[EQ_PRESET].params(minshare=m), grid=grid), truth)

    e_lo, e_hi = err(lo), err(hi)
    if not e_lo <= target <= e_hi:
        return (lo, e_lo) if target < e_lo else (hi, e_hi)
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        e = err(mid)
        if e < target:
            lo, e_lo = mid, e
        else:
            hi, e_hi = mid, e
    return (lo, e_lo) if abs(e_lo - target) <= abs(e_hi - target) else (hi, e_hi)


def equal_error(q, k, v, truth, grid, cudnn, args):
    m, e = bisect_minshare(q, k, v, truth, grid, EQ_TARGET)
    fixed = measure(q, k, v, truth, PRESETS[EQ_PRESET].params(minshare=m), grid, cudnn, args.budget_ms)
    ctrl, trace = adapt(q, k, v, truth, PRESETS[EQ_PRESET], EQ_TARGET, PRESETS[EQ_PRESET].minshare, grid,
                        args.steps, args.rows, args.seed)
    ad = measure(q, k, v, truth, PRESETS[EQ_PRESET].params(minshare=ctrl.thresholds.clone()), grid, cudnn,
                 args.budget_ms)
    ratio = ad["x_cudnn"] / fixed["x_cudnn"]
    # the adaptive run lands near, not on, EQ_TARGET: one minshare at exactly its error too
    m_same, _ = bisect_minshare(q, k, v, truth, grid, ad["rel_l1"])
    same = measure(q, k, v, truth, PRESETS[EQ_PRESET].params(minshare=m_same), grid, cudnn, args.budget_ms)
    print(f"equal error {EQ_TARGET}: fixed minshare {m:.3f} -> rel-L1 {fixed['rel_l1']:.4f} worst head "
          f"{fixed['worst_head']:.4f} sparsity {fixed['sparsity']:.3f} {fixed['x_cudnn']:.3f}x cuDNN; adaptive (from "
          f"{PRESETS[EQ_PRESET].minshare}) rel-L1 {ad['rel_l1']:.4f} worst head {ad['worst_head']:.4f} sparsity "
          f"{ad['sparsity']:.3f} {ad['x_cudnn']:.3f}x cuDNN; time {ratio:.3f}x fixed (goal <= {EQ_MAX}): {_pm(ratio <= EQ_MAX)}"
          f"; one minshare {m_same:.3f} at the adaptive's error {same['rel_l1']:.4f}: "
          f"adaptive {ad['x_cudnn'] / same['x_cudnn']:.3f}x its time")
    return {"target": EQ_TARGET, "fixed_minshare": m, "fixed": fixed, "adaptive": ad, "trace": trace,
            "fixed_at_adaptive_error": dict(same, minshare=m_same), "time_vs_fixed_at_adaptive_error":
            ad["x_cudnn"] / same["x_cudnn"],
            "adaptive_minshare": ctrl.thresholds.tolist(), "time_vs_fixed": ratio, "pass": ratio <= EQ_MAX}


def run_regime(name, args, dev):
    q, k, v, info = make_regime_qkv(name, heads=HEADS, head_dim=HEAD_DIM, seed=args.seed, device=dev)
    grid = info["grid"]  # the video part only: text tokens stay after it
    truth = fp32_dense(q, k, v)
    cudnn = lambda: sdpa_cudnn(q, k, v)  # noqa: E731
    t_cudnn = paired_ratio(cudnn, cudnn, budget_ms=args.budget_ms)[1]
    nk = -(-k.shape[2] // BLOCK_K)
    max_sparsity = 1.0 - 1.0 / nk
    r = {"describe": DESCRIBE[name], "shape": list(q.shape), "grid": list(grid), "n_text": info["n_text"],
         "head_types": info["head_types"], "cudnn_ms": t_cudnn, "max_sparsity": max_sparsity, "presets": {}}
    print(f"\n{name}: {DESCRIBE[name]}; {tuple(q.shape)}, cuDNN {t_cudnn:.2f} ms")
    print(f"{'preset':<9}{'target':>7} | {'fixed':>7}{'worst':>7}{'sparse':>7}{'xcuDNN':>7} | "
          f"{'adapt':>7}{'worst':>7}{'sparse':>7}{'xcuDNN':>7} | {'whole':>6}{'worst':>6}{'speed':>6} | "
          f"{'meas/sparse':>11}")
    for pname in args.presets:
        p = PRESETS[pname]
        fixed = measure(q, k, v, truth, p.params(), grid, cudnn, args.budget_ms)
        ctrl, trace = adapt(q, k, v, truth, p, p.target_rel_l1, p.minshare, grid, args.steps, args.rows, args.seed)
        ad_params = p.params(minshare=ctrl.thresholds.clone())
        ad = measure(q, k, v, truth, ad_params, grid, cudnn, args.budget_ms)
        cost = measurement_cost(q, k, v, ad_params, grid, args.rows, args.budget_ms)
        g = goals(p.target_rel_l1, fixed, ad, max_sparsity)
        r["presets"][pname] = {"target": p.target_rel_l1, "init_minshare": p.minshare, "fixed": fixed, "adaptive": ad,
                               "adaptive_minshare": ctrl.thresholds.tolist(), "trace": trace,
                               "measurement": cost, "goals": g}
        whole = _pm(g["whole"]) + ("*" if g["saturated"] else "")
        print(f"{pname:<9}{p.target_rel_l1:7.3f} | {fixed['rel_l1']:7.4f}{fixed['worst_head']:7.4f}"
              f"{fixed['sparsity']:7.3f}{fixed['x_cudnn']:7.3f} | {ad['rel_l1']:7.4f}{ad['worst_head']:7.4f}"
              f"{ad['sparsity']:7.3f}{ad['x_cudnn']:7.3f} | {whole:>6}{_pm(g['worst']):>6}{_pm(g['speed']):>6} | "
              f"{cost['x_sparse']:11.3f}")
    print("  whole: adaptive rel-L1 within +-25% of target; worst: worst head <= 2x target; speed: "
          f"<= {SLOWER_MAX}x fixed where fixed meets the target, >= {FASTER_MIN}x faster where fixed is below half of it"
          "; * every skippable block skipped, the target is out of reach from below")
    if name == "tuned" and not args.no_equal:
        r["equal_error"] = equal_error(q, k, v, truth, grid, cudnn, args)
    del q, k, v, truth
    torch.cuda.empty_cache()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--steps", type=int, default=8, help="sampled measurements + updates before the final timing")
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="query rows per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-ms", type=float, default=1500.0, help="paired timing budget per setting")
    ap.add_argument("--no-equal", action="store_true", help="skip the equal-error row (needs regime tuned)")
    ap.add_argument("--tag", default="", help="appended to the result file name")
    args = ap.parse_args()
    args.presets = args.presets.split(",")
    regimes = args.regimes.split(",")
    for n in regimes:
        if n not in REGIMES:
            ap.error(f"unknown regime {n!r}; have {', '.join(REGIMES)}")
    for n in args.presets:
        if n not in PRESETS:
            ap.error(f"unknown preset {n!r}; have {', '.join(PRESETS)}")
    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "steps": args.steps, "rows": args.rows, "seed": args.seed, "regimes": {}}
    for name in regimes:
        res["regimes"][name] = run_regime(name, args, dev)
    rows = [(n, p, x["goals"]) for n, r in res["regimes"].items() for p, x in r["presets"].items()]
    res["summary"] = {key: {"pass": sum(g[key] is True for *_, g in rows), "miss": sum(g[key] is False for *_, g in rows)}
                      for key in ("whole", "worst", "speed")}
    print("\nsummary (PASS/MISS): " + ", ".join(f"{k_} {v_['pass']}/{v_['miss']}" for k_, v_ in res["summary"].items()))
    path = save(res, f"{res['date']}-{card_name()}-robustness{'-' + args.tag if args.tag else ''}")
    print("saved", path)


if __name__ == "__main__":
    main()
