"""CPU study (issue 14): what reusing stage 1's block mask across sampling steps costs in error,
over a denoising trajectory rather than one call.

Reusing a mask for P steps would take the lse scoring kernel and the selection (~0.014x of
cuDNN at Wan 480p, bench/NOTES.md) off P-1 of every P calls. The skipped-block estimate's bias
comes from the same scoring pass, so a reused mask comes with its step's (stale) bias; the
estimate's mean keys and values are always the current ones (the quantizers compute them).

The trajectory: devkit/realistic_inputs with a noise level sigma that falls over the steps as
in a flow-matching sampler (x_t = (1 - sigma) x_0 + sigma eps, one eps per run; Wan's shifted
schedule sigma = s t / (1 + (s - 1) t), t from 1 to 0), the same "layer" (seed) at every step.
For each step: the fresh mask and bias (what the node does today), the mask and bias of the last
refresh step for refresh periods P, and, for the shortest period, the stale mask with the fresh
bias (to separate the two effects). Errors: rel-L1 of the whole output and of the worst head
against fp32 dense attention, reference backend (sparge_core.reference), Hilbert order, a preset's
fixed threshold (Balanced by default). Nothing here is tuned: the settings are the preset's, the
schedule Wan's default.

Limits: the inputs model content that emerges from noise under fixed "weights" and fixed
positional structure; a real model also modulates its activations by the timestep, and its
early steps may move attention more than this does.

    python bench/reuse_study.py --sample-qblocks 16   # grid 8x16x24, 12 heads, 30 steps (~15 min, 2 cores)
    python bench/reuse_study.py --grid 21 30 52 --sample-qblocks 8    # Wan 480p, sampled query blocks
"""
import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as `sparge_attention`, puts the root on sys.path)
from devkit.metrics import rel_l1  # noqa: E402
from devkit.realistic_inputs import make_video_qkv  # noqa: E402
from guard_study import sample_query_blocks  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.hilbert import TokenPermutation  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402
from sparge_attention.sparge_core.reference import dense_attention, sparse_attention_reference  # noqa: E402
from sparge_attention.sparge_core.reference_predict import (  # noqa: E402
    fill_bias,
    lse_stage1,
    pool_and_similarity,
    predict_block_mask,
)


def sigmas(steps: int, shift: float) -> list:
    """The noise level of each step's input: t from 1 down (not reaching 0), shifted as Wan does."""
    ts = [1.0 - i / steps for i in range(steps)]
    return [shift * t / (1.0 + (shift - 1.0) * t) for t in ts]


def trajectory_inputs(seed, grid, heads, head_dim, sigma, sample_qblocks, block_q):
    """One step's q, k, v of the trajectory: noise level sigma, Hilbert order, and the sampled
    query blocks only (all of them with sample_qblocks 0)."""
    q, k, v, _ = make_video_qkv(grid=grid, heads=heads, head_dim=head_dim, seed=seed, noise_level=sigma)
    perm = TokenPermutation.for_grid(grid, q.shape[2])
    q, k, v = (perm.apply(x, 2) for x in (q, k, v))
    return sample_query_blocks(q, sample_qblocks, block_q, seed), k, v


def errors(out, ref):
    """(whole rel-L1, worst head rel-L1)."""
    return rel_l1(out, ref), rel_l1(out, ref, dims=(0, 2, 3)).max().item()


def run(seed, grid, heads, head_dim, steps, shift, periods, params, sample_qblocks, log):
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    rows = []
    cache = {}  # step -> (mask, bias) of the fresh prediction
    for i, sigma in enumerate(sigmas(steps, shift)):
        t0 = time.time()
        q, k, v = trajectory_inputs(seed, grid, heads, head_dim, sigma, sample_qblocks, block_q)
        ref = dense_attention(q, k, v)
        mask, bias = predict_block_mask(q, k, params, block_q, block_k, return_fill=True)
        cache[i] = (mask, bias)

        def call(m, b):
            out = sparse_attention_reference(q, k, v, m, params, block_q, block_k, fill=b)[0]
            return errors(out, ref) + (m.float().mean().item(),)

        row = {"step": i, "sigma": sigma, "fresh": call(mask, bias)}
        for P in periods:
            src = i - i % P
            if src != i:
                m_old, b_old = cache[src]
                row[f"reuse{P}"] = call(m_old, b_old)
                if P == periods[0]:  # the stale mask with this step's bias on the blocks it skips
                    scores, mean = lse_stage1(pool_and_similarity(q, block_q)[0], k, block_k, q.shape[-1] ** -0.5)
                    fresh_bias = fill_bias(scores, mean, m_old, params, q.shape[2], k.shape[2], block_q, block_k)
                    row[f"reuse{P}_fresh_bias"] = call(m_old, fresh_bias)
        cache = {s: cache[s] for s in cache if s > i - max(periods)}
        rows.append(row)
        cells = "  ".join(f"{key} {v_[0]:.4f}/{v_[1]:.4f}" for key, v_ in row.items()
                          if isinstance(v_, tuple) and not key.endswith("fresh_bias"))
        log(f"  step {i:2d} sigma {sigma:.3f}  {cells}  ({time.time() - t0:.1f} s)")
    return rows


def summarize(rows, periods):
    """Mean over the steps a period reuses, next to the fresh mask's error on the same steps."""
    out = {}
    for P in periods:
        key = f"reuse{P}"
        used = [r for r in rows if key in r]
        if not used:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out[key] = {
            "steps": len(used),
            "fresh_whole": mean([r["fresh"][0] for r in used]), "reuse_whole": mean([r[key][0] for r in used]),
            "fresh_worst_head": mean([r["fresh"][1] for r in used]),
            "reuse_worst_head": mean([r[key][1] for r in used]),
            "max_ratio_whole": max(r[key][0] / r["fresh"][0] for r in used),
            "max_ratio_worst_head": max(r[key][1] / r["fresh"][1] for r in used),
            "fresh_bias_whole": mean([r[key + "_fresh_bias"][0] for r in used]) if P == periods[0] else None,
            "density_fresh": mean([r["fresh"][2] for r in used]), "density_reuse": mean([r[key][2] for r in used]),
        }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 16, 24))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shift", type=float, default=5.0, help="Wan's flow-matching schedule shift")
    ap.add_argument("--periods", type=int, nargs="+", default=(2, 3, 5))
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--seeds", type=int, nargs="+", default=(1,))
    ap.add_argument("--sample-qblocks", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    params = PRESETS[args.preset].params()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    res = {"date": datetime.date.today().isoformat(), "grid": list(args.grid), "heads": args.heads,
           "head_dim": args.head_dim, "steps": args.steps, "shift": args.shift, "preset": args.preset,
           "sample_qblocks": args.sample_qblocks, "seeds": {}}
    for seed in args.seeds:
        log(f"seed {seed}: grid {tuple(args.grid)}, {args.heads} heads, {args.steps} steps, {args.preset};"
            " rel-L1 whole/worst head")
        rows = run(seed, tuple(args.grid), args.heads, args.head_dim, args.steps, args.shift, args.periods, params,
                   args.sample_qblocks, log)
        summary = summarize(rows, args.periods)
        res["seeds"][seed] = {"rows": rows, "summary": summary}
        for key, s in summary.items():
            log(f"  {key}: over its {s['steps']} reused steps whole {s['fresh_whole']:.4f} -> {s['reuse_whole']:.4f}"
                f" (worst step x{s['max_ratio_whole']:.2f}), worst head {s['fresh_worst_head']:.4f} ->"
                f" {s['reuse_worst_head']:.4f} (worst step x{s['max_ratio_worst_head']:.2f});"
                + (f" stale mask with the fresh bias {s['fresh_bias_whole']:.4f};" if s["fresh_bias_whole"] else "")
                + f" density {s['density_fresh']:.3f} -> {s['density_reuse']:.3f}")
    stem = f"{res['date']}-cpu-reuse_study-grid{'x'.join(map(str, args.grid))}"
    path = common.save(res, stem)
    path.with_suffix(".log").write_text("\n".join(lines) + "\n")
    print("saved", path)


if __name__ == "__main__":
    main()
