"""CPU study (issue 14): why the skipped-block estimate fails on block 0 of a random-weight WanModel.

End to end (bench/e2e_adapt.py) the node keeps the first transformer block of the random-weight
WanModel dense: there the estimate errs at rel-L1 ~0.6-0.9 while every later block skips everything
it may at ~0.015. This builds that block on the CPU (ComfyUI's WanModel, the 1.3B config, one layer,
weights drawn as bench/e2e_wan.build draws them, fp32, a 5 x 30 x 52 token grid), takes its
self-attention's q, k, v as ComfyUI passes them, and measures:
  1. magnitudes: block 0 sees the patch-embedded noise latent, so its tokens are i.i.d.; the
     attention output is then a noisy average of V, far smaller than V;
  2. the reference backend at Balanced's share rule over minshare, estimate on and off, with and
     without the second-order term;
  3. one head with every key block given its EXACT mass and its mean value: what a mean-value
     estimate misses however well the masses are known.

    python bench/block0_study.py [--grid 5 30 52]    (~3 min on 2 cores)
"""
import argparse
import datetime
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402  (loads the pack as `sparge_attention`)
from devkit.metrics import rel_l1  # noqa: E402
from devkit.tiny_models import _import_comfy  # noqa: E402
from e2e_wan import random_weights_  # noqa: E402
from sparge_attention.sparge_core import reference_predict, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.hilbert import TokenPermutation  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402


def block0_qkv(grid):
    """Block 0's self-attention q, k, v (1, H, N, D) fp32, from a one-layer random-weight WanModel."""
    comfy = _import_comfy()
    import comfy.ldm.wan.model as wm

    taken = {}
    real = wm.optimized_attention

    def take(q, k, v, heads, **kw):
        if "q" not in taken and q.shape[1] == k.shape[1]:
            taken.update(q=q.clone(), k=k.clone(), v=v.clone(), heads=heads)
        return real(q, k, v, heads, **kw)

    wm.optimized_attention = take
    try:
        dm = wm.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256,
                         text_dim=4096, out_dim=16, device="cpu", dtype=torch.float32,
                         operations=comfy.ops.disable_weight_init, dim=1536, ffn_dim=8960, num_heads=12,
                         num_layers=1)
        g = torch.Generator().manual_seed(0)
        random_weights_(dm, g)  # as bench/e2e_wan.build
        with torch.no_grad():
            T, Hg, Wg = grid
            x = torch.randn(1, 16, T, 2 * Hg, 2 * Wg, generator=g)
            dm(x, torch.full((1,), 500.0), torch.randn(1, 512, 4096, generator=g))
    finally:
        wm.optimized_attention = real
    B, N, C = taken["q"].shape
    h = taken["heads"]
    return [t.view(B, N, h, C // h).transpose(1, 2).contiguous() for t in (taken["q"], taken["k"], taken["v"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(5, 30, 52))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    grid = tuple(args.grid)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    q, k, v = block0_qkv(grid)
    N, D = q.shape[2], q.shape[3]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    vm = v.mean(2, keepdim=True)
    res = {"date": datetime.date.today().isoformat(), "device": "cpu", "grid": grid, "tokens": N,
           "mean_abs_v": v.abs().mean().item(), "abs_mean_v": vm.abs().mean().item(),
           "mean_abs_o": ref.abs().mean().item(), "mean_abs_o_minus_mean_v": (ref - vm).abs().mean().item()}
    log(f"block 0, grid {grid} ({N} tokens): mean|v| {res['mean_abs_v']:.4f}, |mean v| {res['abs_mean_v']:.4f}, "
        f"mean|o| {res['mean_abs_o']:.4f}, mean|o - mean v| {res['mean_abs_o_minus_mean_v']:.4f}")
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    log(f"logits std {s.std():.3f} (natural units), row max - row mean {(s.amax(-1) - s.mean(-1)).mean():.3f}")
    del s
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    res["rows"] = []
    clamp0 = reference_predict.FILL_ORDER2_CLAMP
    log("reference backend, Balanced's share rule, Hilbert order; rel-L1 against fp32 attention, and the same "
        "error over mean|v|")
    for ms in (0.5, 1.0, 1.5, 2.5):
        for fill, clamp in ((False, clamp0), (True, 0.0), (True, clamp0)):
            reference_predict.FILL_ORDER2_CLAMP = clamp
            try:
                out, st = sparge_attention(qb, kb, vb, PRESETS["Balanced"].params(minshare=ms, fill_skipped=fill),
                                           backend="reference", grid=grid, return_stats=True)
            finally:
                reference_predict.FILL_ORDER2_CLAMP = clamp0
            e = (out.float() - ref).abs().mean().item()
            row = dict(minshare=ms, fill=fill, order2=fill and clamp > 0, sparsity=st.sparsity,
                       rel_l1=rel_l1(out.float(), ref), err_over_v=e / res["mean_abs_v"])
            res["rows"].append(row)
            name = "drop" if not fill else ("estimate" if clamp > 0 else "estimate, first order")
            log(f"  minshare {ms:3.1f} {name:22s} sparsity {st.sparsity:.3f}  rel-L1 {row['rel_l1']:.3f}  "
                f"error / mean|v| {row['err_over_v']:.4f}")
    # one head in Hilbert order: every key block as its exact mass times its mean value
    perm = TokenPermutation.for_grid(grid, N)
    qh, kh, vh = (perm.apply(t, 2)[0, 3] for t in (q, k, v))
    BK = 128
    NK = N // BK
    p = torch.softmax((qh[:256] @ kh.T) * D ** -0.5, -1)[:, :NK * BK].view(-1, NK, BK)
    vblk = vh[:NK * BK].view(NK, BK, D)
    o_true = torch.einsum("rjk,jkd->rd", p, vblk)
    o_means = torch.einsum("rj,jd->rd", p.sum(-1), vblk.mean(1))
    res["exact_mass_mean_value_rel_l1"] = ((o_means - o_true).abs().mean() / o_true.abs().mean()).item()
    log(f"head 3, 256 rows, every key block as its exact mass x its mean value: rel-L1 "
        f"{res['exact_mass_mean_value_rel_l1']:.3f}")
    out = ROOT / "bench" / "results" / f"{res['date']}-cpu-block0_study"
    out.with_suffix(".json").write_text(__import__("json").dumps(res, indent=1))
    out.with_suffix(".log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
