"""CPU study (issue 14): stage 1's lse scores from a sample of each key block's keys.

The lse scoring kernel (kernels/block_scores.py) is ~a third of prediction + quantization at Wan
480p (127 us of ~365, bench/NOTES.md), and its work is per key: one int8 product column, one
exp2 and two reductions for each of the block's 128 keys. Scoring every s-th key of each block
and adding log2(s) would cut that work s-fold. What it costs: a block whose mass sits on a few
keys can lose them from the sample and be under-scored (skipped where it mattered), and the
skipped-block estimate's bias (lse - mean score) then carries the sample's error.

Variants, all on the reference backend (sparge_core.reference), Hilbert order, share mode with
the estimate, each at a sweep of minshare values:
  full        the scores before v31 (every key; the mean score over the block's keys)
  sN/exact    every N-th key of the block (the block's first key onwards) for the lse, the mean
              score over all of the block's keys (what an exact mean would give: from the
              block's mean key, as the estimate uses)
  sN/sampled  the mean score over the same sampled keys
  sN+norm/exact  as sN/exact, and the block's largest-norm key read exactly, the sample's keys
              (every N-th) standing for the other n - 1
  reference   reference_predict.block_lse_scores at stride 2 (the kernel's key_stride 2: every 2nd key,
              the top key in place of its group's, the mean score against the block's int8 mean
              key): it errs on random keys (NOTES v31)
  guarded     the same with the guard (reference_predict.lse_exact_blocks: blocks of low key
              self-similarity and a partial last block read in full; NOTES v32)
  guarded4    the same at stride 4 (every 4th key and the top one)
The top key and the guard's similarity are production's (v55: the key holding the block's largest
|value|, energy_similarity); the run that compared them with v54's largest-norm key by the int8
values (both with the energy guard) is 2026-12-06-cpu-lse_sample_study-energy-max (its "guarded"
row v54's key, "guarded-max" v55's).
Errors: rel-L1 of the whole output and of the worst head against fp32 dense attention, on
sampled query blocks (exact for those rows, see guard_study.sample_query_blocks); the density
is the kept fraction of (query block, key block) pairs. The inputs are none of the ones the
presets were tuned on (realistic_bench uses seed 0 and the default head mix): other seeds,
other head mixes, text tokens, a noisy step.

    python bench/lse_sample_study.py                       # three regimes (~10 min on 2 cores)
    python bench/lse_sample_study.py --regimes wan480-seed5 hunyuan-mix-text256-seed6 --variants full reference --tag=-ref
    python bench/lse_sample_study.py --variants full guarded --tag=-guarded
"""
import argparse
import datetime
import json
import math
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
    block_lse_scores,
    block_top_keys,
    fill_bias,
    lse_exact_blocks,
    mean_keys_i8,
    pool_and_similarity,
    select_blocks,
)
from sparge_attention.sparge_core.reference_quant import (  # noqa: E402
    LOG2E,
    expand_kv,
    quantize_int8_per_block,
    int8_values,
    smooth_k,
    split_blocks,
)

REGIMES = {
    # name: make_video_qkv arguments (none of them the tuning inputs: seed 0, default heads, no text)
    "wan480-seed5": dict(grid=(21, 30, 52), heads=12, seed=5),
    "hunyuan-mix-text256-seed6": dict(grid=(9, 34, 60), heads=12, seed=6, n_text=256,
                                      head_types=["sink", "global", "sink", "temporal", "local", "spatial"] * 2),
    "wan480-noisy0.6-seed7": dict(grid=(13, 30, 52), heads=12, seed=7, noise_level=0.6,
                                  head_types=["local", "temporal", "global", "spatial"] * 3),
}
VARIANTS = ("full", "s2/exact", "s2/sampled", "s4/exact", "s2+norm/exact", "s4+norm/exact", "reference", "guarded",
            "guarded4")
SHARES = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)


def sampled_lse(q_pool, k, block_k, scale, stride, mean_mode, with_norm=False):
    """(lse, mean) scores (B,H,NQ,NK) in log2 units, as reference_predict.block_lse_scores computes them
    (int8 pooled queries, smoothed int8 keys), but the lse over every `stride`-th key of each block
    (block positions 0, stride, ...) scaled up by (real keys / sampled real keys)."""
    n_k = k.shape[2]
    H = q_pool.shape[1]
    k_i8, k_scale = quantize_int8_per_block(smooth_k(k.float()), block_k)
    qamax = q_pool.abs().amax(-1, keepdim=True).clamp_min(1e-20)
    q_i8 = int8_values(q_pool, qamax)
    kd = expand_kv(split_blocks(k_i8.float(), block_k), H)
    s = torch.einsum("bhqd,bhjkd->bhqjk", q_i8, kd)
    ks = expand_kv(k_scale[..., None], H)[..., 0]
    s = s * ((qamax / 127.0)[..., None] * ks[:, :, None, :, None] * (scale * LOG2E))
    NK = kd.shape[2]
    pos = torch.arange(NK * block_k).view(NK, block_k)
    valid = pos < n_k
    picked = valid & (torch.arange(block_k)[None, :] % stride == 0)
    mean_keys = picked if mean_mode == "sampled" else valid
    mean = s.masked_fill(~mean_keys, 0.0).sum(-1) / mean_keys.sum(-1).float()
    if not with_norm:
        t = s.masked_fill(~picked, -math.inf)
        m = t.amax(-1)
        lse = m + torch.log2(torch.exp2(t - m[..., None]).sum(-1))
        lse = lse + torch.log2(valid.sum(-1).float() / picked.sum(-1).float())
        return lse, mean
    # the block's largest-norm key exactly (a sink is one), the others estimated from the sample
    norms = kd.float().norm(dim=-1).masked_fill(~valid, -1.0)  # (B,H,NK,BK)
    top = torch.nn.functional.one_hot(norms.argmax(-1), block_k).bool()  # (B,H,NK,BK)
    rest = picked & ~top  # (B,H,NK,BK) via broadcasting
    n_rest = (valid & ~top).sum(-1).float()  # (B,H,NK)
    scale_up = n_rest / rest.sum(-1).float().clamp_min(1)
    t = s.masked_fill(~(rest | top)[:, :, None], -math.inf)
    m = t.amax(-1)
    e = torch.exp2(t - m[..., None])
    tot = (e * top[:, :, None]).sum(-1) + scale_up[:, :, None] * (e * rest[:, :, None]).sum(-1)
    return m + torch.log2(tot), mean


def mask_row(variant, minshare, mask, q, k, v, ref, lse, mean, params, head_types):
    """One sweep row for a block mask: the estimate's bias from lse and mean, the reference's output
    with it, its density and error (whole, worst head) against ref."""
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    bias = fill_bias(lse, mean, mask, params, q.shape[2], k.shape[2], block_q, block_k)
    out = sparse_attention_reference(q, k, v, mask, params, block_q, block_k, fill=bias)[0]
    per_head = rel_l1(out, ref, dims=(0, 2, 3))
    return dict(variant=variant, minshare=minshare, density=mask.float().mean().item(), whole=rel_l1(out, ref),
                worst_head=per_head.max().item(), worst_head_type=head_types[int(per_head.argmax())])


def sweep_shares(variant, shares, q, k, v, ref, qp, qs, select_scores, lse, mean, head_types, log):
    """One row per minshare (Balanced's share rule with the estimate): the blocks chosen by
    select_scores (log2 units), the estimate's bias from lse and mean, the error against ref."""
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    scale = q.shape[-1] ** -0.5
    rows = []
    for share in shares:
        params = PRESETS["Balanced"].params(minshare=share)
        mask = select_blocks(qp, qs, None, None, params, scale, q.shape[2], k.shape[2], block_q, block_k,
                             select_scores)
        row = mask_row(variant, share, mask, q, k, v, ref, lse, mean, params, head_types)
        rows.append(row)
        log(f"  {variant:12s} minshare {share:5.1f}  density {row['density']:.4f}  "
            f"rel-L1 {row['whole']:.4f}  worst head {row['worst_head']:.4f} ({row['worst_head_type']})")
    return rows


def regime_inputs(name, kw, sample_qblocks, log, sample_rows=None):
    """A regime's q, k, v in Hilbert order, q cut to the sampled query blocks, with its info, the
    exact output of those rows and the pooled queries with their self-similarity. sample_rows: the
    size of the sampled chunks (a multiple of the query block; default one block), sample_qblocks
    of them."""
    block_q = block_sizes(torch.device("cpu"), "reference")[0]
    t0 = time.time()
    q, k, v, info = make_video_qkv(**kw)
    perm = TokenPermutation.for_grid(info["grid"], q.shape[2])
    q, k, v = (perm.apply(x, 2) for x in (q, k, v))
    q = sample_query_blocks(q, sample_qblocks, sample_rows or block_q, kw["seed"])
    ref = dense_attention(q, k, v)
    qp, qs = pool_and_similarity(q, block_q)
    log(f"{name}: N={k.shape[2]}, {q.shape[2]} sampled query rows, heads {info['head_types']} "
        f"({time.time() - t0:.0f} s to build)")
    return q, k, v, info, ref, qp, qs


def run_regime(name, kw, sample_qblocks, variants, log):
    block_k = block_sizes(torch.device("cpu"), "reference")[1]
    q, k, v, info, ref, qp, qs = regime_inputs(name, kw, sample_qblocks, log)
    scale = q.shape[-1] ** -0.5
    rows = []
    for variant in variants:
        if variant in ("reference", "guarded", "guarded4"):  # the reference's estimator at stride 2 (4)
            stride = 4 if variant == "guarded4" else 2
            ksm = smooth_k(k.float())
            k_i8, k_scale = quantize_int8_per_block(ksm, block_k)
            exact = lse_exact_blocks(ksm, block_k, stride=stride) if variant != "reference" else None
            if exact is not None:
                log(f"  guarded: {exact.float().mean().item():.4f} of the key blocks read in full")
            lse, mean = block_lse_scores(qp, k_i8, k_scale, scale, k.shape[2], block_k, want_mean=True,
                                         kbar=mean_keys_i8(ksm, block_k), stride=stride, exact=exact,
                                         top=block_top_keys(ksm, block_k, k.shape[2]))
        else:
            head = variant.split("/")[0]
            stride = 1 if variant == "full" else int(head[1:].split("+")[0])
            mean_mode = "exact" if variant == "full" else variant.split("/")[1]
            lse, mean = sampled_lse(qp, k, block_k, scale, stride, mean_mode, with_norm=head.endswith("+norm"))
        rows += sweep_shares(variant, SHARES, q, k, v, ref, qp, qs, lse, lse, mean, info["head_types"], log)
    return rows


def density_at(rows, variant, target, key="whole"):
    """The kept density where `key` crosses `target`, interpolated in log(density) between the
    sweep's two neighbouring points (None when the sweep does not bracket it)."""
    pts = sorted((r["density"], r[key]) for r in rows if r["variant"] == variant)
    for (d0, e0), (d1, e1) in zip(pts, pts[1:]):
        if (e0 - target) * (e1 - target) <= 0 and e0 != e1:
            f = (target - e0) / (e1 - e0)
            return math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0)))
    return None


def sweep_study(study: str, regimes: dict, variants, run_regime_fn):
    """The command line and the report shared by the CPU sweeps over regimes (this study and
    select_error_study): run_regime_fn(name, inputs, sample_qblocks, variants, log) -> rows; writes
    the log and JSON as bench/results/<date>-cpu-<study><tag>."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--regimes", nargs="+", default=list(regimes))
    ap.add_argument("--sample-qblocks", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=list(variants))
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    result = {"date": datetime.date.today().isoformat(), "device": "cpu", "sample_qblocks": args.sample_qblocks,
              "regimes": {}}
    for name in args.regimes:
        rows = run_regime_fn(name, regimes[name], args.sample_qblocks, args.variants, log)
        summary = {v: {"density_at_0.05": density_at(rows, v, 0.05),
                       "density_at_worst_head_0.10": density_at(rows, v, 0.10, "worst_head")} for v in args.variants}
        for v, s in summary.items():
            fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
            log(f"  {name} {v:12s}: density at rel-L1 0.05 {fmt(s['density_at_0.05'])}, "
                f"at worst head 0.10 {fmt(s['density_at_worst_head_0.10'])}")
        result["regimes"][name] = {"inputs": {k_: list(v_) if isinstance(v_, tuple) else v_
                                              for k_, v_ in regimes[name].items()},
                                   "rows": rows, "summary": summary}
    out = Path(__file__).resolve().parent / "results" / f"{result['date']}-cpu-{study}{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sweep_study("lse_sample_study", REGIMES, VARIANTS, run_regime)
