"""CPU study (issue 14): the estimate over groups of adjacent skipped key blocks, one key per group.

The fill pass gives every skipped key block one key in a row's softmax (its mean key and value,
fill_order2_study's grp8 weight: the pooled query's lse bias plus the grouped second-order term). Its
cost is one column per key block of the clip, skipped or not: ceil(NK / 128) steps per query block,
2 at Wan 480p (256 blocks) and 5 at HunyuanVideo 544p (528 blocks), by its steps ~25-30% of the
Balanced kernel at HunyuanVideo. Here G adjacent key blocks (Hilbert order: neighbours in space and time) that a query
block skips all together join as ONE key: their count-weighted mean key and value, their channel
variance over all their keys (the spread between the blocks' means included, so the second-order
term sees it), and the pooled query's exact lse over the group. A group with a kept block keeps its
skipped blocks' own keys. The columns a query block then needs: its all-skipped groups plus the
skipped blocks of its other groups, about NK / G + a few.

The other direction: each query block's m skipped blocks of most pooled mass (just below the
share threshold, where the estimate's error sits) as their two halves, 64 keys each (their own
means, variances and the pooled query's exact lse): m more columns a query block. HunyuanVideo 544p
(528 blocks in 5 steps of 128) has 112 columns of padding in its last step that could hold them.

Variants (the same masks: Balanced's share rule over the pooled query's lse, swept over minshare;
fp32 everywhere, so only the estimate differs):
  g1   production's estimate (every skipped block its own key), the term held within +-2
  g2   pairs of blocks, g4 groups of four, g8 of eight
  s16  the 16 skipped blocks of most pooled mass as halves (s56: 56, ...)
  w16  the window of 16 contiguous blocks holding the most skipped mass, its skipped blocks as halves
       (one run of half blocks: a kernel could load it as one tile at a per-query-block offset)
  s16a the same, each half's bias from its parent's lse split by the halves' cumulant expansion for
       the pooled query (anchored_halves: what a kernel could use without an lse per half)
Findings (NOTES v71): groups cost more density than the steps they save; halves cut it ~20%, but
on the GPU their gathered step cost what that saved.
Per row: density, rel-L1 of the whole output and of the worst head against fp32 dense attention,
and the fill columns a query block needs as a share of NK (mean and largest), with the steps of
128 columns they take at the regime's NK against production's.

    python bench/fill_group_study.py                        # three regimes (~10 min on 2 cores)
    python bench/fill_group_study.py --regimes wan480-seed5 --variants g1 g2 --tag=-quick
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as `sparge_attention`, puts the root on sys.path)
from devkit.metrics import rel_l1  # noqa: E402
from fill_order2_study import SHARES, head_parts, regime_mask, regime_parts  # noqa: E402
from lse_sample_study import REGIMES, regime_inputs, sweep_study  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.reference_quant import block_token_counts, smooth_k  # noqa: E402

VARIANTS = ("g1", "g2", "g4", "g8")
LN2 = math.log(2.0)
CLAMP = 2.0  # the second-order term's bound (log2 units), as fill_order2_study's diag<2
GROUP_CH = 8  # channels per variance group (the kernel's VAR_GROUPS = 16 at head dim 128)
STEP = 128  # fill columns per step on Hopper (kernels/config.py fill_block)


def grouped_quad(x2, var):
    """The grouped second-order term's product: each row's x^2 (R, D) summed over groups of GROUP_CH
    channels against each column's variance (C, D) averaged over the same groups -> (R, C)."""
    grp = lambda x: x.view(x.shape[0], -1, GROUP_CH)  # noqa: E731
    return grp(x2).sum(-1) @ grp(var).mean(-1).T


def group_table(P, G, block_k):
    """Per group of G adjacent key blocks (the last one may be shorter): count-weighted mean key and
    value, channel variance over the group's keys, and the pooled queries' exact lse (log2 units)."""
    NK, D = P["NK"], P["kbar"].shape[1]
    gid = torch.arange(NK) // G
    NG = int(gid[-1]) + 1
    cnt = block_token_counts(P["s"].shape[1], block_k)
    cg = torch.zeros(NG).index_add_(0, gid, cnt)
    kbar = torch.zeros(NG, D).index_add_(0, gid, cnt[:, None] * P["kbar"]) / cg[:, None]
    vbar = torch.zeros(NG, D).index_add_(0, gid, cnt[:, None] * P["vbar"]) / cg[:, None]
    ek2 = torch.zeros(NG, D).index_add_(0, gid, cnt[:, None] * (P["var"] + P["kbar"] ** 2)) / cg[:, None]
    var = (ek2 - kbar ** 2).clamp_min(0.0)
    lse = torch.stack([torch.logsumexp(P["lse_pool"][:, gid == g] * LN2, -1) / LN2 for g in range(NG)], 1)
    return dict(kbar=kbar, vbar=vbar, var=var, lse_pool=lse, gid=gid, NG=NG)


def logits(P, T, block_q):
    """(R, columns) log2 weights of table T's columns (each a mean key: its kbar, var and lse_pool,
    as head_parts and group_table hold them) for every sampled row: q . kbar + the pooled query's
    lse bias + the grouped second-order term within +-CLAMP."""
    qs, qp = P["qs"], P["qp"]
    rows_blk = torch.arange(qs.shape[0]) // block_q
    bias = (T["lse_pool"] - qp @ T["kbar"].T)[rows_blk]
    quad = grouped_quad(qs * qs - (qp * qp)[rows_blk], T["var"])
    return qs @ T["kbar"].T + bias + (0.5 * LN2 * quad).clamp(-CLAMP, CLAMP)


def anchored_halves(P, H2):
    """The half-block table with each half's pooled-query lse from the cumulant expansion (log2 n +
    qp . kbar + the grouped second-order term), shifted so that a block's two halves sum to the
    block's own pooled lse: needs no lse per half from the scoring kernel."""
    qp, NH = P["qp"], H2["NK"]
    cnt = block_token_counts(P["s"].shape[1], P["vb"].shape[1] // 2)  # keys per half block
    c = torch.log2(cnt) + qp @ H2["kbar"].T + 0.5 * LN2 * grouped_quad(qp * qp, H2["var"])
    parent = torch.arange(NH) // 2
    tot = torch.zeros(qp.shape[0], P["NK"]).index_add_(1, parent, torch.exp2(c - c.amax(-1, keepdim=True)))
    tot = torch.log2(tot) + c.amax(-1, keepdim=True)
    shift = (P["lse_pool"] - tot)[:, parent]
    return dict(H2, lse_pool=c + shift)


def mix(P, keep_rows, estimates, block_k):
    """Every sampled row's output: its kept blocks' keys exactly, with the estimate's columns
    [(log2 weights (R, C), mean values (C, D)), ...] in the same softmax."""
    N = P["s"].shape[1]
    s = P["s"].masked_fill(~keep_rows[:, torch.arange(N) // block_k], -math.inf)
    parts = [(s, P["vb"].view(P["NK"] * block_k, -1)[:N]), *estimates]
    mx = torch.stack([t.amax(-1) for t, _ in parts]).amax(0)[:, None]
    num = sum(torch.exp2(t - mx) @ v for t, v in parts)
    den = sum(torch.exp2(t - mx).sum(-1) for t, _ in parts)
    return num / den[:, None]


def estimate_split(P, H2, keep_rows, m, block_q, block_k, window=False):
    """Every sampled row's output with its kept blocks exact, its query block's m skipped blocks of
    most pooled mass as two half-block keys each (table H2: head_parts at block_k / 2) and the other
    skipped blocks as one key each; and each row's fill column count (NK + m)."""
    R, NK = P["s"].shape[0], P["NK"]
    lse = P["lse_pool"][torch.arange(R) // block_q].masked_fill(keep_rows, -math.inf)
    if window:  # the m contiguous blocks of most skipped mass: one run of halves, loadable as one tile
        w = torch.exp2(lse - lse.amax(-1, keepdim=True))
        c = torch.nn.functional.pad(w.cumsum(-1), (1, 0))
        m_ = min(m, NK)
        start = (c[:, m_:] - c[:, :-m_]).argmax(-1)
        pos = torch.arange(NK)[None, :]
        split = (pos >= start[:, None]) & (pos < start[:, None] + m_) & ~keep_rows
    else:
        top = lse.topk(min(m, NK), -1).indices
        split = torch.zeros_like(keep_rows).scatter_(1, top, True) & ~keep_rows
    t1 = logits(P, P, block_q).masked_fill(keep_rows | split, -math.inf)
    th = logits(P, H2, block_q).masked_fill(~split.repeat_interleave(2, 1)[:, :H2["NK"]], -math.inf)
    return mix(P, keep_rows, [(t1, P["vbar"]), (th, H2["vbar"])], block_k), NK + split.sum(-1)


def estimate(P, keep_rows, G, block_q, block_k):
    """Every sampled row's output with its kept blocks exact, each all-skipped group of G blocks as
    one key and the other skipped blocks as one key each; and each row's fill column count."""
    R, NK = P["s"].shape[0], P["NK"]
    t1 = logits(P, P, block_q)
    estimates = []
    if G > 1:
        T = group_table(P, G, block_k)
        kept_in_group = torch.zeros(R, T["NG"]).index_add_(1, T["gid"], keep_rows.float()) > 0
        tg = logits(P, T, block_q).masked_fill(kept_in_group, -math.inf)
        single_used = ~keep_rows & kept_in_group[:, T["gid"]]
        t1 = t1.masked_fill(~single_used, -math.inf)
        cols = (~kept_in_group).sum(-1) + single_used.sum(-1)
        estimates.append((tg, T["vbar"]))
    else:
        t1 = t1.masked_fill(keep_rows, -math.inf)
        cols = torch.full((R,), NK)  # production computes every column, kept ones at weight 0
    return mix(P, keep_rows, [(t1, P["vbar"]), *estimates], block_k), cols


def run_regime(name, kw, sample_qblocks, variants, log):
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    parts, ref, info, qp_all, qs_all, n_k = regime_parts(name, kw, sample_qblocks, log)
    halves = []
    if any(v.startswith(("s", "w")) for v in variants):  # the same inputs' tables at half the key block
        q, k, v, *_ = regime_inputs(name, kw, sample_qblocks, log)
        ksm = smooth_k(k.float())
        H, Hkv = q.shape[1], k.shape[1]
        halves = [head_parts(q[0, h], ksm[0, h * Hkv // H], v[0, h * Hkv // H], block_q, block_k // 2)
                  for h in range(H)]
    lse = torch.stack([P["lse_pool"] for P in parts])[None]
    NK = parts[0]["NK"]
    base_steps = -(-NK // STEP)
    rows_blk = torch.arange(ref.shape[2]) // block_q
    rows = []
    for share in SHARES:
        mask = regime_mask(parts, qp_all, qs_all, n_k, lse, share)
        for variant in variants:
            n = int(variant[1:].rstrip("a"))
            if variant.startswith(("s", "w")):
                tables = [anchored_halves(P, halves[h]) if variant.endswith("a") else halves[h]
                          for h, P in enumerate(parts)]
                outs, cols = zip(*(estimate_split(P, tables[h], mask[0, h][rows_blk], n, block_q, block_k,
                                                  window=variant.startswith("w"))
                                   for h, P in enumerate(parts)))
            else:
                outs, cols = zip(*(estimate(P, mask[0, h][rows_blk], n, block_q, block_k)
                                   for h, P in enumerate(parts)))
            out = torch.stack(outs)[None]
            cols = torch.stack(cols).float()  # (H, R): the same within a query block
            steps = torch.ceil(cols / STEP)
            per_head = rel_l1(out, ref, dims=(0, 2, 3))
            row = dict(variant=variant, minshare=share, density=mask.float().mean().item(), whole=rel_l1(out, ref),
                       worst_head=per_head.max().item(), worst_head_type=info["head_types"][int(per_head.argmax())],
                       fill_cols_mean=cols.mean().item() / NK, fill_cols_max=cols.max().item() / NK,
                       fill_steps_mean=steps.mean().item(), fill_steps_max=steps.max().item(), base_steps=base_steps)
            rows.append(row)
            log(f"  {variant:3s} minshare {share:5.1f}  density {row['density']:.4f}  rel-L1 {row['whole']:.4f}  "
                f"worst head {row['worst_head']:.4f} ({row['worst_head_type']})  fill columns "
                f"{row['fill_cols_mean']:.3f} (max {row['fill_cols_max']:.3f}) of {NK}, steps "
                f"{row['fill_steps_mean']:.2f} (max {row['fill_steps_max']:.0f}) vs {base_steps}")
    return rows


if __name__ == "__main__":
    sweep_study("fill_group_study", REGIMES, VARIANTS, run_regime)
