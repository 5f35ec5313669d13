"""What return_lse costs and how exact the lse is (issue 16: ring attention merges partial outputs
over key shards by their log-sum-exp), on realistic video attention with the Balanced preset.

- time: the whole sparse call (prediction, quantization, kernel, Hilbert grid) with return_lse
  against the same call without it, in alternating pairs (common.paired_ratio);
- accuracy, sparse: the Triton call's lse against the PyTorch reference backend's on the same
  inputs, over the query blocks whose predicted mask rows agree (float sums may flip a block at a
  threshold; such rows sum different blocks, so their lse differ by design);
- accuracy, keep-all: a keep-all call's lse against the logsumexp that PyTorch's flash attention
  returns (torch.ops.aten._scaled_dot_product_flash_attention), i.e. int8 quantization only.

    python bench/lse_cost.py [--shapes wan480] [--no-reference]
    TRITON_INTERPRET=1 python bench/lse_cost.py --shapes tiny --device cpu   (a CPU check: no timing)
"""
import argparse
import datetime
import math

import torch

from common import SHAPES, card_name, paired_ratio, save
from devkit.realistic_inputs import make_video_qkv
from sparge_attention.sparge_core import SpargeParams, sparge_attention
from sparge_attention.sparge_core.hilbert import TokenPermutation
from sparge_attention.sparge_core.presets import PRESETS

SHAPES = dict(SHAPES, tiny=(1, 2, 2 * 6 * 20, 64, (2, 6, 20), 0))  # the CPU check's shape
KEEP_ALL = SpargeParams(simthreshd1=-1.0, cdfthreshd=1.0, pvthreshd=math.inf)


def exact_lse(q, k, v, scale):
    """The dense logsumexp (B,H,N): flash attention's on CUDA (what a ring engine merges with),
    fp32 torch.logsumexp elsewhere."""
    if q.is_cuda:
        lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[1]
        return lse[..., :q.shape[2]].float()
    return torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, -1)


def agreeing_rows(mask_a, mask_b, block_q, n, perm):
    """Per query token in the caller's order: True where both masks keep the same key blocks for
    its query block (masks are in Hilbert order when perm is given)."""
    rows = (mask_a == mask_b).all(-1).repeat_interleave(block_q, -1)[..., :n]
    return perm.invert(rows, 2) if perm is not None else rows


def lse_vs_reference(q, k, v, params, grid, backend):
    """(max, mean) |lse - reference lse| over rows with agreeing masks, and that share of rows."""
    _, lse, st = sparge_attention(q, k, v, params, grid=grid, backend=backend, return_lse=True, return_stats=True)
    # the lse does not depend on the P.V type (the denominator sums unrounded P): the reference's default
    _, rlse, rst = sparge_attention(q, k, v, params, grid=grid, backend="reference", return_lse=True,
                                    return_stats=True)
    assert st.backend == "triton" and (st.block_q, st.block_k) == (rst.block_q, rst.block_k)
    perm = TokenPermutation.for_grid(grid, q.shape[2], device=q.device) if grid is not None else None
    rows = agreeing_rows(st.block_mask.to_dense(), rst.block_mask.to_dense(), st.block_q, q.shape[2], perm)
    d = (lse - rlse).abs()[rows]
    return float(d.max()), float(d.mean()), float(rows.float().mean()), float(st.sparsity)


def lse_vs_exact(q, k, v, grid, backend):
    """(max, mean) |keep-all lse - exact lse| and the keep-all call's lse magnitude."""
    _, lse = sparge_attention(q, k, v, KEEP_ALL, grid=grid, backend=backend, return_lse=True)
    want = exact_lse(q, k, v, q.shape[-1] ** -0.5)
    d = (lse - want).abs()
    return float(d.max()), float(d.mean()), float(want.abs().mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480")
    ap.add_argument("--preset", default="Balanced")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend comparison")
    args = ap.parse_args()
    dev = torch.device(args.device)
    backend = "auto" if dev.type == "cuda" else "triton"  # the CPU check runs the kernels interpreted
    params = PRESETS[args.preset].params()
    res = {"card": card_name(), "date": datetime.date.today().isoformat(), "preset": args.preset, "shapes": {}}
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, seed=0, device=dev)
        r = res["shapes"][name] = {"shape": list(q.shape)}
        if dev.type == "cuda":
            ratio, t_lse, t_plain = paired_ratio(
                lambda: sparge_attention(q, k, v, params, grid=grid, return_lse=True),
                lambda: sparge_attention(q, k, v, params, grid=grid))
            r.update(ratio=ratio, ms_lse=t_lse, ms_plain=t_plain)
        if not args.no_reference:
            r["ref_max"], r["ref_mean"], r["ref_rows"], r["sparsity"] = lse_vs_reference(q, k, v, params, grid, backend)
        r["exact_max"], r["exact_mean"], r["lse_mag"] = lse_vs_exact(q, k, v, grid, backend)
        del q, k, v
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\nreturn_lse, preset {args.preset}, {res['card']}")
    print(f"{'shape':<10} {'ms plain':>9} {'ms lse':>9} {'ratio':>7} {'sparsity':>9} {'|d| ref max':>12} "
          f"{'mean':>9} {'rows':>6} {'|d| keep-all max':>17} {'mean':>9} {'|lse|':>7}")
    for name, r in res["shapes"].items():
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-".rjust(int(fmt.split(".")[0]))
        print(f"{name:<10} {f('ms_plain', '9.3f')} {f('ms_lse', '9.3f')} {f('ratio', '7.4f')} {f('sparsity', '9.3f')} "
              f"{f('ref_max', '12.2e')} {f('ref_mean', '9.2e')} {f('ref_rows', '6.3f')} {f('exact_max', '17.2e')} "
              f"{f('exact_mean', '9.2e')} {f('lse_mag', '7.2f')}")
    print("ratio: time with return_lse / without (paired). |d| ref: Triton lse vs the reference backend's, over "
          "rows whose query block's mask agrees (rows: that share). |d| keep-all: a keep-all call's lse vs "
          "flash attention's logsumexp (int8 quantization only).")
    if dev.type == "cuda":
        print("saved", save(res, f"{res['date']}-{res['card']}-lse_cost"))


if __name__ == "__main__":
    main()
