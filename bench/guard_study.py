"""CPU study: which guards for the skipped-block estimate (fill_skipped) pay, before any is built
into the Triton kernels (issue 13 item 3).

fill_skipped estimates every skipped key block as ONE key (its mean key and mean value, with a
per-(query block, key block) bias). A guard is a set of key blocks forced to be computed exactly:
mask[..., guard] = True and the fill bias of those pairs set to -inf (not estimated twice).
Guards studied (per head, key-block columns):
  text   key blocks holding text tokens (joint attention: text after the video grid)
  sink   key blocks holding a key whose norm is > NORM_FACTOR x the median key norm, or that
         receives outsized pooled attention: its mass under the pooled queries' softmax over all
         keys, averaged over query blocks, is > sink_factor x the even share 1/N
  frame0 key blocks whose tokens are mostly in the first latent frame
  hetero the top p% key blocks by spread ||K_blk - mean K_blk||_F (p matched to the cost of the
         other guards together)
  pisa   the top p% key blocks by PISA's first-order error ||(K_blk - mean)^T (V_blk - mean)||_F
Everything runs in the order the kernel sees (3D Hilbert order of the video grid, as
sparge_core/api.py applies it when a grid is given; text tokens stay last), with the reference
backend's blocks (sparge_core.api.block_sizes on CPU: 64 queries x 128 keys) and the reference's
public functions (predict_block_mask / sparse_attention_reference / dense_attention).

"Equal time" = equal kept-block density: the sparse kernel's time is about a fixed part plus a
part linear in the kept blocks, so two masks of equal density cost the same. Each guard's curve
(share-mode minshare swept over a geometric grid) is compared with the unguarded curve at the
densities the unguarded presets (minshare 0.5 / 1.5 / 3 / 8) reach, interpolating log error in
log density. Errors: rel-L1 of the whole output and of the worst head, against fp32 dense.

Tuning/checking separation: no parameter is fit on error. sink_factor is set a priori to block_k
(one key holding as much pooled attention as an average whole block); NORM_FACTOR = 4; p of the
heterogeneity guards is the mean cost of text|sink|frame0 on the tuning seed (cost only, no error);
everything reported comes from the other seeds. --sink-factors with several values picks one on the
tuning seed by worst-head gain (sink guard only) before the report.

    python bench/guard_study.py            # full study, seed 1 (~9 min on 2 cores; --seeds 1 2: ~18 min)
    python bench/guard_study.py --quick    # tiny grid, one seed, for tests (~10 s)
    python bench/guard_study.py --grid 8 16 24 --regimes text256 sink --guards text sink   # a subset
    python bench/guard_study.py --grid 21 30 52 --head-dim 128 --sample-qblocks 24 --guards sink  # Wan 480p
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
import common  # noqa: E402  (loads the pack as `sparge_attention`, puts the root on sys.path)
from devkit.metrics import rel_l1  # noqa: E402
from devkit.realistic_inputs import REGIMES, make_regime_qkv  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.hilbert import TokenPermutation  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402
from sparge_attention.sparge_core.reference import dense_attention, sparse_attention_reference  # noqa: E402
from sparge_attention.sparge_core.reference_predict import predict_block_mask  # noqa: E402
from sparge_attention.sparge_core.reference_quant import smooth_k, split_blocks  # noqa: E402

PRESET_SHARES = (0.5, 1.5, 3.0, 8.0)
STUDY_REGIMES = ("tuned", "content", "sink", "uniform", "peaked", "text256", "text512")
FULL_TEXT = 32760  # the regimes' text counts are for Wan 480p's 32,760 video tokens; scaled to our grid
NORM_FACTOR = 4.0
GUARDS = ("text", "sink", "frame0", "hetero", "pisa", "abc")
TARGETS = {  # the regimes each guard is meant for (gain counted there; elsewhere only its cost)
    "text": ("text256", "text512"),
    "sink": ("sink", "tuned", "text256", "text512"),
    "frame0": STUDY_REGIMES,
    "hetero": STUDY_REGIMES,
    "pisa": STUDY_REGIMES,
    "abc": STUDY_REGIMES,
}


def make_case(regime, grid, heads, head_dim, seed):
    n_video = math.prod(grid)
    n_text = round(REGIMES[regime].get("n_text", 0) * n_video / FULL_TEXT)
    q, k, v, info = make_regime_qkv(regime, grid=grid, heads=heads, head_dim=head_dim, seed=seed, n_text=n_text)
    perm = TokenPermutation.for_grid(grid, q.shape[2])  # the kernel's visiting order
    q, k, v = (perm.apply(x, 2) for x in (q, k, v))
    frame = info["positions"][perm.perm, 0]  # -1 for text
    return q, k, v, frame, n_video, n_text


def guard_features(q, k, v, frame, n_video, block_q, block_k):
    """Per head and key block (H, NK): the raw features the guards threshold."""
    B, H, N, D = k.shape
    scale = D ** -0.5
    nk = split_blocks(torch.zeros(1, 1, N, 1), block_k).shape[2]
    tok_blk = torch.arange(N) // block_k
    is_text = torch.zeros(nk, dtype=torch.bool).index_put_((tok_blk[n_video:],), torch.tensor(True))
    f0 = torch.zeros(nk).index_add_(0, tok_blk, (frame == 0).float())
    cnt = torch.zeros(nk).index_add_(0, tok_blk, torch.ones(N))
    # Hilbert blocks span several frames: guard the blocks richest in frame-0 tokens, as many as frame 0
    # would fill if it were block-aligned
    n_f0 = max(1, math.ceil((frame == 0).sum().item() / block_k))
    is_f0 = torch.zeros(nk, dtype=torch.bool)
    is_f0[(f0 / cnt).topk(n_f0).indices] = True
    kf, vf = k.float()[0], v.float()[0]
    norm = kf.norm(dim=-1)  # (H, N)
    norm_out = norm > NORM_FACTOR * norm.median(-1, keepdim=True).values
    qp = split_blocks(q.float(), block_q)[0].mean(-2)  # pooled queries (H, NQ, D); padding rows count 0
    prob = torch.softmax(qp @ smooth_k(kf[None])[0].transpose(-1, -2) * scale, dim=-1)  # (H, NQ, N)
    col_mass = prob.mean(1) * N  # mass a key receives, in units of the even share 1/N
    kb = split_blocks(kf[None], block_k)[0]  # (H, NK, BK, D), zero padded
    vb = split_blocks(vf[None], block_k)[0]
    valid = (torch.arange(nk * block_k) < N).view(nk, block_k)[None, :, :, None]
    kc = torch.where(valid, kb - (kb * valid).sum(-2, keepdim=True) / cnt[None, :, None, None], 0.0)
    vc = torch.where(valid, vb - (vb * valid).sum(-2, keepdim=True) / cnt[None, :, None, None], 0.0)
    spread = kc.norm(dim=(-1, -2)) / cnt.sqrt()
    pisa = (kc.transpose(-1, -2) @ vc).norm(dim=(-1, -2)) * scale / cnt

    def per_block(x):  # (H, N) bool -> (H, NK) any
        return torch.zeros(H, nk).index_add_(1, tok_blk, x.float()) > 0

    return dict(text=is_text.expand(H, nk), frame0=is_f0.expand(H, nk), frame0_cover=f0[is_f0].sum() / f0.sum(), norm_out=per_block(norm_out),
                col_mass_max=split_blocks(col_mass[None, :, :, None], block_k)[0, ..., 0].amax(-1),
                spread=spread, pisa=pisa)


def top_share(score, p):
    """The top fraction p of key blocks of each head by score (at least one when p > 0)."""
    H, nk = score.shape
    n = round(p * nk)
    out = torch.zeros(H, nk, dtype=torch.bool)
    if n > 0:
        out.scatter_(1, score.topk(n, dim=1).indices, True)
    return out


def make_guards(feat, sink_factor, p_hetero):
    sink = feat["norm_out"] | (feat["col_mass_max"] > sink_factor)
    g = dict(text=feat["text"], sink=sink, frame0=feat["frame0"],
             hetero=top_share(feat["spread"], p_hetero), pisa=top_share(feat["pisa"], p_hetero))
    g["abc"] = g["text"] | g["sink"] | g["frame0"]
    return g


def run_point(q, k, v, ref, mask, fill, block_q, block_k, pv_dtype, params):
    out, _ = sparse_attention_reference(q, k, v, mask, params, block_q, block_k, None, pv_dtype, fill)
    heads = rel_l1(out, ref, dims=(0, 2, 3))
    return dict(density=mask.float().mean().item(), rel_l1=rel_l1(out, ref), worst_head=heads.max().item(),
                heads=[round(x, 5) for x in heads.tolist()])


def sweep(q, k, v, ref, guards, shares, block_q, block_k, pv_dtype):
    """{guard or "none": [point per minshare]}; the mask and bias are predicted once per minshare."""
    curves = {name: [] for name in ("none",) + tuple(guards)}
    for m in shares:
        params = PRESETS["Balanced"].params(minshare=m)
        mask, fill = predict_block_mask(q, k, params, block_q, block_k, return_fill=True)
        curves["none"].append(dict(minshare=m, **run_point(q, k, v, ref, mask, fill, block_q, block_k, pv_dtype,
                                                           params)))
        for name, g in guards.items():
            mg = mask | g[None, :, None, :]
            fg = fill.masked_fill(mg, -math.inf)
            curves[name].append(dict(minshare=m, **run_point(q, k, v, ref, mg, fg, block_q, block_k, pv_dtype,
                                                             params)))
    return curves


def interp(curve, key, density):
    """log(error) interpolated linearly in log(density); None outside the curve's range."""
    pts = sorted((c["density"], c[key]) for c in curve)
    xs = [math.log(d) for d, _ in pts]
    ys = [math.log(max(e, 1e-9)) for _, e in pts]
    x = math.log(density)
    if x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    for i in range(len(xs) - 1):
        if xs[i] - 1e-9 <= x <= xs[i + 1] + 1e-9:
            if xs[i + 1] - xs[i] < 1e-12:
                return math.exp(min(ys[i], ys[i + 1]))
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return math.exp(ys[i] + t * (ys[i + 1] - ys[i]))
    return math.exp(ys[0])


def compare(curves, shares):
    """Per guard and preset minshare: both errors of the guard at the unguarded preset's density."""
    out = {}
    for name, curve in curves.items():
        if name == "none":
            continue
        rows = []
        for m in PRESET_SHARES:
            base = min(curves["none"], key=lambda c: abs(math.log(c["minshare"] / m)))
            row = dict(minshare=m, density=base["density"], base_rel_l1=base["rel_l1"],
                       base_worst=base["worst_head"])
            for key, col in (("rel_l1", "guard_rel_l1"), ("worst_head", "guard_worst")):
                row[col] = interp(curve, key, base["density"])
            rows.append(row)
        out[name] = rows
    return out


def gain(row, col, base):
    return None if row[col] is None else 1.0 - row[col] / row[base]


def identity_check(block_q, block_k, pv_dtype):
    """Guarding every key block must equal the keep-all result exactly."""
    q, k, v, frame, n_video, _ = make_case("sink", (4, 16, 16), 2, 64, 0)
    params = PRESETS["Turbo"].params()
    mask, fill = predict_block_mask(q, k, params, block_q, block_k, return_fill=True)
    allg = torch.ones_like(mask)
    guarded, _ = sparse_attention_reference(q, k, v, mask | allg, params, block_q, block_k, None, pv_dtype,
                                            fill.masked_fill(allg, -math.inf))
    keep_all, _ = sparse_attention_reference(q, k, v, allg, params, block_q, block_k, None, pv_dtype, None)
    return dict(equal=bool(torch.equal(guarded, keep_all)), sparse_density=mask.float().mean().item())


def fmt(x, pct=False):
    if x is None:
        return "   -  "
    return f"{x * 100:+5.0f}%" if pct else f"{x:.4f}"


def table(regime, comp, guard_cost):
    lines = [f"== {regime}  (gain = 1 - guard/none at the unguarded preset's density; + is better)",
             f"{'guard':7s} {'cost':>5s} | " + " | ".join(f"ms={m:<4g} d={'':4s} worst none/gain  all none/gain"
                                                      for m in PRESET_SHARES)]
    for name, rows in comp.items():
        cells = [f"d={r['density']:.3f} {fmt(r['base_worst'])} {fmt(gain(r, 'guard_worst', 'base_worst'), 1)} "
                 f"{fmt(r['base_rel_l1'])} {fmt(gain(r, 'guard_rel_l1', 'base_rel_l1'), 1)}" for r in rows]
        lines.append(f"{name:7s} {guard_cost[name]:5.3f} | " + " | ".join(cells))
    return "\n".join(lines)


def sample_query_blocks(q, n_blocks, block_q, seed):
    """q restricted to n_blocks whole query blocks (sorted, drawn with `seed`; the last, partial block
    never): the mask, the estimate's bias and every output row of a block depend only on that
    block's own rows and on all keys, so the sampled rows get exactly what the full call gives them."""
    full = q.shape[2] // block_q
    if not n_blocks or n_blocks >= full:
        return q
    g = torch.Generator().manual_seed(1000 + seed)
    pick = torch.randperm(full, generator=g)[:n_blocks].sort().values
    rows = (pick[:, None] * block_q + torch.arange(block_q)[None, :]).flatten()
    return q.index_select(2, rows)


def study(regimes, seeds, grid, heads, head_dim, shares, sink_factor, p_hetero, block_q, block_k, pv_dtype, log,
          only=GUARDS, sample_qblocks=0):
    res = {}
    for regime in regimes:
        per_seed = []
        for seed in seeds:
            t0 = time.time()
            q, k, v, frame, n_video, n_text = make_case(regime, grid, heads, head_dim, seed)
            feat = guard_features(q, k, v, frame, n_video, block_q, block_k)  # all queries' pooled attention
            q = sample_query_blocks(q, sample_qblocks, block_q, seed)
            ref = dense_attention(q, k, v).float()
            guards = {n: g for n, g in make_guards(feat, sink_factor, p_hetero).items() if n in only}
            cost = {n: g.float().mean().item() for n, g in guards.items()}  # share of columns, = density floor
            curves = sweep(q, k, v, ref, guards, shares, block_q, block_k, pv_dtype)
            per_seed.append(dict(seed=seed, n_text=n_text, guard_cost=cost, curves=curves,
                                 frame0_tokens_covered=feat["frame0_cover"].item(),
                                 compare=compare(curves, shares), seconds=round(time.time() - t0, 1)))
            log(f"[{regime} seed {seed}: {time.time() - t0:.0f}s, guard cost {', '.join(f'{n} {c:.3f}' for n, c in cost.items())}]")
        res[regime] = per_seed
    return res


def mean_gains(res, seeds_ok=None):
    """Per guard and regime: mean over seeds and preset points (where matched) of the worst-head and
    whole-output gains."""
    out = {}
    for regime, per_seed in res.items():
        for s in per_seed:
            if seeds_ok is not None and s["seed"] not in seeds_ok:
                continue
            for name, rows in s["compare"].items():
                d = out.setdefault(name, {}).setdefault(regime, dict(worst=[], all=[]))
                for r in rows:
                    gw, ga = gain(r, "guard_worst", "base_worst"), gain(r, "guard_rel_l1", "base_rel_l1")
                    if gw is not None:
                        d["worst"].append(gw)
                        d["all"].append(ga)
    return {n: {r: dict(worst=sum(x["worst"]) / len(x["worst"]) if x["worst"] else None,
                        all=sum(x["all"]) / len(x["all"]) if x["all"] else None, points=len(x["worst"]))
                for r, x in per.items()} for n, per in out.items()}


def verdict(gains):
    """Pays: the worst head improves by >= 10% (mean over seeds and matched points) in at least one
    regime it targets, and loses no more than 2% in any regime."""
    out = {}
    for name, per in gains.items():
        tgt = [per[r]["worst"] for r in TARGETS[name] if r in per and per[r]["worst"] is not None]
        allr = [per[r]["worst"] for r in per if per[r]["worst"] is not None]
        best_target = max(tgt) if tgt else None
        worst_any = min(allr) if allr else None
        pays = best_target is not None and best_target >= 0.10 and worst_any >= -0.02
        out[name] = dict(pays=bool(pays), best_target_gain=best_target, worst_gain_anywhere=worst_any)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid, one seed, few thresholds (a test)")
    ap.add_argument("--grid", type=int, nargs=3, default=(6, 16, 16))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pv-dtype", default="fp8", choices=("fp8", "fp16", "fp32"))
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=(1,))
    ap.add_argument("--sink-factors", type=float, nargs="+", default=None, help="default: block_k")
    ap.add_argument("--regimes", nargs="+", default=STUDY_REGIMES)
    ap.add_argument("--guards", nargs="+", default=GUARDS, choices=GUARDS)
    ap.add_argument("--sample-qblocks", type=int, default=0,
                    help="errors over this many sampled query blocks per case (full shapes on a CPU); 0: all")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<date>-cpu-guard_study.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    block_q, block_k = block_sizes(torch.device("cpu"))
    # the presets' thresholds plus points past them: a guard adds blocks, so its curve must reach
    # below the unguarded Turbo density
    shares = [0.5, 1.5, 3.0, 5.0, 8.0, 16.0]
    if args.sink_factors is None:
        args.sink_factors = (float(block_k),)
    if args.quick:
        args.grid, args.heads, args.head_dim, args.seeds = (2, 8, 16), 4, 64, (1,)
        shares = [0.5, 3.0, 16.0]
    grid = tuple(args.grid)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    t_start = time.time()
    ident = identity_check(block_q, block_k, args.pv_dtype)
    log(f"identity: guard everything == keep-all: {ident['equal']} (unguarded density {ident['sparse_density']:.3f})")
    log(f"grid {grid} heads {args.heads} head_dim {args.head_dim} blocks {block_q}x{block_k} pv {args.pv_dtype}, "
        f"Hilbert order, minshare grid {[round(s, 3) for s in shares]}")

    # p for the heterogeneity guards: about the cost of text + sink + frame0 together, measured on the tuning seed
    tune = {}
    tuning = None
    if len(args.sink_factors) > 1:
        for f in args.sink_factors:
            log(f"-- tuning seed {args.tune_seed}: sink_factor {f}")
            tuning = study(args.regimes, (args.tune_seed,), grid, args.heads, args.head_dim, shares, f, 0.0,
                           block_q, block_k, args.pv_dtype, log, only=("sink",))
            g = mean_gains(tuning)["sink"]
            tune[f] = dict(mean_worst_gain=sum(x["worst"] or 0.0 for x in g.values()) / len(g), per_regime=g)
            log(f"   sink gain (worst head, mean over regimes) {tune[f]['mean_worst_gain']:+.3f}")
        sink_factor = max(tune, key=lambda f: tune[f]["mean_worst_gain"])
    else:
        sink_factor = args.sink_factors[0]
    cost_abc = []
    for regime in args.regimes:
        q, k, v, frame, n_video, _ = make_case(regime, grid, args.heads, args.head_dim, args.tune_seed)
        g = make_guards(guard_features(q, k, v, frame, n_video, block_q, block_k), sink_factor, 0.0)
        cost_abc.append(g["abc"].float().mean().item())
    p_hetero = max(1.0 / (split_blocks(torch.zeros(1, 1, q.shape[2], 1), block_k).shape[2]),
                   sum(cost_abc) / len(cost_abc))
    log(f"chosen on seed {args.tune_seed}: sink_factor {sink_factor}, p_hetero {p_hetero:.3f} "
        f"(mean cost of text|sink|frame0)")

    res = study(args.regimes, args.seeds, grid, args.heads, args.head_dim, shares, sink_factor, p_hetero,
                block_q, block_k, args.pv_dtype, log, only=tuple(args.guards), sample_qblocks=args.sample_qblocks)
    for regime, per_seed in res.items():
        for s in per_seed:
            log(table(f"{regime} seed {s['seed']} (n_text {s['n_text']})", s["compare"], s["guard_cost"]))
    gains = mean_gains(res)
    verd = verdict(gains)
    log("== mean gain over seeds and matched preset points, worst head (whole output)")
    log(f"{'guard':7s} " + " ".join(f"{r:>16s}" for r in args.regimes) + "  verdict")
    for name, per in gains.items():
        cells = " ".join(f"{fmt(per[r]['worst'], 1):>7s} ({fmt(per[r]['all'], 1):>6s})" if r in per else f"{'':16s}"
                         for r in args.regimes)
        log(f"{name:7s} {cells}  {'PAYS' if verd[name]['pays'] else 'no'}")
    log(f"total {time.time() - t_start:.0f}s")

    result = dict(config=dict(grid=grid, heads=args.heads, head_dim=args.head_dim, blocks=[block_q, block_k],
                              pv_dtype=args.pv_dtype, order="hilbert", shares=shares, seeds=list(args.seeds),
                              tune_seed=args.tune_seed, sink_factor=sink_factor, p_hetero=p_hetero,
                              norm_factor=NORM_FACTOR, quick=args.quick, targets=TARGETS,
                              sample_qblocks=args.sample_qblocks),
                  identity=ident, tuning=tune, regimes=res, gains=gains, verdict=verd, log=lines)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    else:
        path = common.save(result, f"{datetime.date.today().isoformat()}-cpu-guard_study")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
