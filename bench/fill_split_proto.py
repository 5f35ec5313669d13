"""Split columns on the GPU (NOTES v71, a prototype): error and time at equal error on the realistic inputs.

The CPU study (fill_group_study.py) found that giving each query block's m skipped blocks of
highest stage-1 score two keys (their halves' means) instead of one cuts the density rel-L1 0.05
needs by ~20%. Here, on the realistic benchmark's inputs (realistic_bench.py, Hilbert order), at
Balanced's share rule over a sweep of minshare:
  - the error of production's call and of the same call with m split blocks (rel-L1 of the whole
    output against fp32 dense attention, and the worst head), on the same mask;
  - the attention kernel alone with and without the split columns, each paired with SDPA-cuDNN;
  - prediction + quantization (prepare_sparse) paired with cuDNN, and the prototype's PyTorch
    preparation of the split columns (sparge_core/triton_split.split_inputs) timed alone.
The whole call is prediction + quantization + the kernel; the split's PyTorch preparation is
reported beside it (a fused form would take the halves' sums in K's and V's quantizers).
Then where each family crosses rel-L1 0.05 (interpolated in log density, as realistic_bench).

    python bench/fill_split_proto.py [--shapes wan480,hunyuan544] [--m 16,32]
"""
import argparse
import datetime
import math

import torch

from common import SHAPES, card_name, paired_ratio, realistic_text_tokens, save, sdpa_cudnn
from devkit.metrics import rel_l1
from devkit.realistic_inputs import make_video_qkv
from realistic_bench import fp32_dense
from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
from sparge_attention.sparge_core.hilbert import TokenPermutation
from sparge_attention.sparge_core.presets import PRESETS
from sparge_attention.sparge_core.reference_predict import FILL_ORDER2_CLAMP
from sparge_attention.sparge_core.triton_call import prepare_sparse
from sparge_attention.sparge_core.triton_split import split_inputs

SHARES = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
TARGET = 0.05


def kernel_call(P, params, n, d, dtype, fill, split):
    mask = P["block_mask"]
    H = P["q_i8"].shape[1]
    pvt = params.per_head("pvthreshd", H, P["q_i8"].device)
    return lambda: sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], mask.kv_num_blocks,
                                   mask.kv_indices, pvt, n, n, d, dtype, False, False, P["cfg"], fill=fill,
                                   fill_split=split, fill_clamp=FILL_ORDER2_CLAMP)[0]


def event_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def crossing(rows, variant):
    """(density, whole call x cuDNN, whole call with the torch prep) where rel-L1 crosses TARGET."""
    pts = sorted((r["density"], r["rel_l1"], r["call_x"], r["call_x_with_prep"]) for r in rows if r["variant"] == variant)
    for (d0, e0, x0, y0), (d1, e1, x1, y1) in zip(pts, pts[1:]):
        if (e0 - TARGET) * (e1 - TARGET) <= 0 and e0 != e1:
            f = (TARGET - e0) / (e1 - e0)
            return dict(density=math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0))),
                        call_x=x0 + f * (x1 - x0), call_x_with_prep=y0 + f * (y1 - y0))
    return None


def run_shape(name, ms, log):
    B, H, N, D, grid, _ = SHAPES[name]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run under the interpreter
    q, k, v, info = make_video_qkv(grid=grid, heads=H, head_dim=D, n_text=realistic_text_tokens(name), seed=0,
                                   device=dev)
    perm = TokenPermutation.for_grid(info["grid"], q.shape[2])
    q, k, v = (perm.apply(x, 2).contiguous() for x in (q, k, v))
    n = q.shape[2]
    truth = fp32_dense(q, k, v)
    cudnn = lambda: sdpa_cudnn(q, k, v)  # noqa: E731
    scale = D ** -0.5
    rows = []
    log(f"\n{name} {tuple(q.shape)}")
    log(f"{'variant':<8} {'minshare':>8} {'density':>8} {'rel-L1':>7} {'worst':>7} {'kernel x':>8} {'pred x':>7} "
        f"{'call x':>7} {'prep ms':>7}")
    for share in SHARES:
        params = PRESETS["Balanced"].params(minshare=share)
        P = prepare_sparse(q, k, v, params, scale)
        pred_x = paired_ratio(lambda: prepare_sparse(q, k, v, params, scale), cudnn)[0]
        density = P["block_mask"].kv_num_blocks.float().sum().item() / (B * H * P["block_mask"].kv_indices.shape[2]
                                                                          * P["block_mask"].kv_indices.shape[3])
        for m in (0, *ms):
            if m:
                fill, split = split_inputs(P, k, v, m, scale)
                prep_ms = event_ms(lambda: split_inputs(P, k, v, m, scale))
            else:
                fill, split, prep_ms = P["fill"], None, 0.0
            fn = kernel_call(P, params, n, D, q.dtype, fill, split)
            out = fn()
            e = rel_l1(out, truth)
            worst = max(rel_l1(out[:, h], truth[:, h]) for h in range(H))
            del out
            kx, k_ms, c_ms = paired_ratio(fn, cudnn)
            row = dict(variant=f"m{m}", m=m, minshare=share, density=density, rel_l1=e, worst_head_rel_l1=worst,
                       kernel_x=kx, kernel_ms=k_ms, pred_x=pred_x, call_x=pred_x + kx, prep_ms=prep_ms,
                       call_x_with_prep=pred_x + kx + prep_ms / c_ms, cudnn_ms=c_ms)
            rows.append(row)
            log(f"{row['variant']:<8} {share:8.1f} {density:8.4f} {e:7.4f} {worst:7.4f} {kx:8.4f} {pred_x:7.4f} "
                f"{row['call_x']:7.4f} {prep_ms:7.3f}")
        del P
        torch.cuda.empty_cache()
    at = {f"m{m}": crossing(rows, f"m{m}") for m in (0, *ms)}
    for var, c in at.items():
        log(f"  {name} {var}: at rel-L1 {TARGET} " + (f"density {c['density']:.4f}, whole call {c['call_x']:.4f}x cuDNN "
                                                     f"({c['call_x_with_prep']:.4f}x with the torch prep)" if c
                                                     else "not bracketed"))
    return dict(shape=list(q.shape), rows=rows, at_target=at)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--m", default="16,32", help="split blocks per query block (2m columns, padded to 32/64)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    ms = tuple(int(x) for x in args.m.split(","))
    res = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
               m=ms, shapes={})
    for name in args.shapes.split(","):
        res["shapes"][name] = run_shape(name, ms, log)
        torch.cuda.empty_cache()
    res["log"] = lines
    print("saved", save(res, f"{res['date']}-{card_name()}-fill_split{args.tag}"))


if __name__ == "__main__":
    main()
