"""What fill_skipped costs, piece by piece, on realistic video attention at one mask: the
prediction with and without the extra outputs (GPU time, graph replay), and the attention kernel
without and with the fill pass. Ratios to SDPA-cuDNN measured in the same run. (The fill-pass
variants measured slower, 128 means per step and skipping all-kept steps, are in bench/NOTES.md v18.)

    python bench/fill_cost.py [--shapes wan480,hunyuan544] [--minshare 1.5] [--causal] [--stages 3,2]

--causal: causal attention (the selection drops the blocks past the diagonal; token order, no
Hilbert order) against causal cuDNN. --stages: the kernel rows at each of these num_stages (Hopper
compiles causal kernels with 3-deep K/V buffers at 3 stages, NOTES v59); default the config's.
"""
import argparse
import dataclasses
import datetime
import math

import torch

from common import SHAPES, bench_graph_ms, bench_ms, card_name, realistic_text_tokens, save, sdpa_cudnn
from devkit.realistic_inputs import make_video_qkv
from sparge_attention.kernels import attn_fwd
from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
from sparge_attention.sparge_core import SpargeParams
from sparge_attention.sparge_core.reference_predict import FILL_ORDER2_CLAMP
from sparge_attention.sparge_core.triton_call import prepare_sparse
from sparge_attention.sparge_core.hilbert import TokenPermutation


def compiled_stats():
    """(n_regs, n_spills) of every compiled attention kernel so far (Triton's cache)."""
    out = []
    try:
        for cache in attn_fwd._sparse_attn_fwd.device_caches.values():
            for k in cache[0].values():
                out.append((getattr(k, "n_regs", None), getattr(k, "n_spills", None)))
    except Exception as e:  # noqa: BLE001 - diagnostics only
        out.append(str(e))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--minshare", type=float, default=1.5)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--stages", default="", help="comma-separated num_stages for the kernel rows")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "causal": args.causal,
           "shapes": {}}
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        n_text = realistic_text_tokens(name)
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, n_text=n_text, seed=0, device=dev)
        N = q.shape[2]
        perm = None if args.causal else TokenPermutation.for_grid(grid, N, device=dev).perm32
        scale = D ** -0.5
        t_cudnn = bench_ms(lambda: sdpa_cudnn(q, k, v, is_causal=args.causal))
        base = dict(simthreshd1=-1.0, minshare=args.minshare, pvthreshd=math.inf, scoring="lse", is_causal=args.causal)
        p0, p1 = SpargeParams(**base), SpargeParams(**base, fill_skipped=True)
        prep = {}
        r = res["shapes"][name] = {"cudnn_ms": t_cudnn, "rows": []}
        for label, p in (("no fill", p0), ("fill", p1)):
            P = prep[label] = prepare_sparse(q, k, v, p, scale, None, "auto", perm, perm)
            t = bench_graph_ms(lambda p=p: prepare_sparse(q, k, v, p, scale, None, "auto", perm, perm))
            r["rows"].append({"part": f"prediction + quantization, {label}", "ms": t, "x_cudnn": t / t_cudnn})
        P0, P1 = prep["no fill"], prep["fill"]
        assert torch.equal(P0["block_mask"].kv_num_blocks, P1["block_mask"].kv_num_blocks)
        cfg, bm = P1["cfg"], P1["block_mask"]
        density = float(bm.kv_num_blocks.float().sum()) / (bm.kv_indices.numel())

        def kern(fill=None, cfg=cfg):
            return sparse_attn_fwd(P1["q_i8"], P1["k_i8"], P1["v_t"], P1["q_s"], P1["k_s"], P1["v_scale"],
                                   bm.kv_num_blocks, bm.kv_indices, p1.per_head("pvthreshd", H, dev), N, N, D,
                                   q.dtype, args.causal, False, cfg, out_perm=perm, fill=fill,
                                   fill_clamp=FILL_ORDER2_CLAMP)[0]

        stages = [int(x) for x in args.stages.split(",")] if args.stages else [None]
        for st in stages:
            c = cfg if st is None else dataclasses.replace(cfg, num_stages=st, causal_stages=0)
            tag = "" if st is None else f", {st} stages"
            for label, fill in (("kernel, no fill", None), (f"kernel, fill (step {c.fill_block})", P1["fill"])):
                t = bench_ms(lambda fill=fill, c=c: kern(fill, c))
                r["rows"].append({"part": label + tag, "ms": t, "x_cudnn": t / t_cudnn})
        r["density"] = density
        r["compiled"] = compiled_stats()
        print(f"\n{name} {tuple(q.shape)} minshare {args.minshare}{' causal' if args.causal else ''}: density {density:.3f}, cuDNN {t_cudnn:.2f} ms")
        for row in r["rows"]:
            print(f"  {row['part']:<46} {row['ms']:8.3f} ms {row['x_cudnn']:7.4f}x")
        print("  compiled (n_regs, n_spills):", r["compiled"])
        del q, k, v, prep, P0, P1
        torch.cuda.empty_cache()
    print("saved", save(res, f"{res['date']}-{card_name()}-fill_cost" + ("_causal" if args.causal else "")))


if __name__ == "__main__":
    main()
