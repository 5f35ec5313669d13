"""End to end: one denoising step of ComfyUI 0.3.75's real WanModel (random bf16 weights),
batch 2 (cond + uncond), with ComfyUI's default attention, with self-attention removed (the
floor), and with the Sparge Attention node's override at each preset.

    python bench/e2e_wan.py [--models wan13b_480,wan14b_720] [--steps 3]

Needs ComfyUI's code: .comfyui/ComfyUI (made by scripts/setup.sh) travels with the device call.
Random weights make attention nearly uniform: the share-mode presets with minshare > 1 then
keep only each row's top block and let the skipped-block estimate stand in for the rest, while
Quality (minshare 0.5) keeps most blocks. These rows show speed, not quality. The table also
shows a fixed-density setting (top-k 0.25) and, for every row, the Amdahl bound that the
attention time measured in the same run allows.
"""
import argparse
import datetime
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from common import ROOT, bench_ms, card_name, save, sdpa_cudnn

sys.path.insert(0, str(ROOT / ".comfyui" / "ComfyUI"))

MODELS = {  # name: (WanModel kwargs, latent (C, T, H, W), layers note)
    "wan13b_480": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), (16, 21, 60, 104), "all 30 layers"),
    "wan14b_720": (dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=8), (16, 21, 90, 160), "8 of 40 layers"),
    # short clips (17 and 33 frames at 480p): where the per-call host time starts to matter
    "wan13b_480_17f": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), (16, 5, 60, 104), "all 30 layers"),
    "wan13b_480_33f": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), (16, 9, 60, 104), "all 30 layers"),
}


def build(kw, dev):
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    dm = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256, text_dim=4096,
                  out_dim=16, device=dev, dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init, **kw)
    random_weights_(dm, torch.Generator(device=dev).manual_seed(0))
    return dm.eval()


def random_weights_(dm, g):
    """The benches' random weights: matrices N(0, 0.02), norm weights 1, biases 0 (in place)."""
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def wan_inputs(name, dev):
    """(model, x, t, context, heads, head_dim, tokens, layers note) of MODELS[name]: batch 2 (cond +
    uncond), seeded random latent and text conditioning."""
    kw, (C, T, Hh, Ww), note = MODELS[name]
    dm = build(kw, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(2, C, T, Hh, Ww, device=dev, dtype=torch.bfloat16, generator=g)
    t = torch.full((2,), 500.0, device=dev)
    ctx = torch.randn(2, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    heads = kw["num_heads"]
    tg, hg, wg = grid_of(name)
    return dm, x, t, ctx, heads, kw["dim"] // heads, tg * hg * wg, note


def grid_of(name):
    """The (t, h, w) token grid of MODELS[name] (patch 1 x 2 x 2)."""
    _, (_, T, Hh, Ww), _ = MODELS[name]
    return T, Hh // 2, Ww // 2


def floor_override(func, *args, **kwargs):
    """Self-attention removed: return q unchanged (same shape), keep cross-attention."""
    q, k = args[0], args[1]
    if q.shape[-2 if kwargs.get("skip_reshape") else 1] == k.shape[-2 if kwargs.get("skip_reshape") else 1]:
        return q
    return func(*args, **kwargs)


def step_time(dm, x, t, ctx, to_factory, steps, after=None):
    """Median seconds of one forward; `after(transformer_options)` runs after each timed one."""
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            to = to_factory()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dm(x, t, ctx, transformer_options=to)
            torch.cuda.synchronize()
            if i:  # the first forward compiles kernels: it stays out of the timing and the stats
                times.append(time.perf_counter() - t0)
                if after is not None:
                    after(to)
    return statistics.median(times)


def calibration_rows(dm, x, t, ctx, grid, heads, t_default, steps):
    """One sampling step while calibrating: every self-attention call is observed by the
    Calibrator (sampled query blocks, per-head thresholds for rel-L1 <= 0.05) and returns dense
    attention, as the calibration node does. Reported as a multiple of one dense step."""
    from sparge_attention.sparge_core.calibrate import Calibrator
    from sparge_attention.sparge_core.layout import split_heads

    rows = []
    for blocks in (16, 8):
        cal = Calibrator(0.05, sample_query_blocks=blocks, fill=True)  # as the Calibrate node does by default
        state = {"layer": 0}

        def override(func, *args, **kwargs):
            q, k, v = args[:3]
            if q.shape[1] == k.shape[1]:  # self-attention (Wan: (B, N, H*D))
                H = kwargs.get("heads", heads)
                cal.observe(state["layer"], split_heads(q, H), split_heads(k, H), split_heads(v, H), grid=grid)
                state["layer"] += 1
            return func(*args, **kwargs)

        def factory():
            state["layer"] = 0
            return {"optimized_attention_override": override}

        t_cal = step_time(dm, x, t, ctx, factory, steps)
        prof = cal.result(model_family="wan21", n_layers=state["layer"], steps=steps + 1)
        row = {"sample_query_blocks": blocks, "calibration_step_s": t_cal, "x_dense_step": t_cal / t_default,
               "profile_mean_sparsity": float(prof.sparsity.mean()), "profile_mean_rel_l1": float(prof.rel_l1.mean())}
        rows.append(row)
        print(f"calibration step ({blocks} sampled query blocks per call): {t_cal:.3f} s = "
              f"{t_cal / t_default:.2f}x a dense step; profile sparsity {row['profile_mean_sparsity']:.3f}, "
              f"sampled rel-L1 {row['profile_mean_rel_l1']:.3f}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="wan13b_480,wan14b_720")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--calibrate", action="store_true", help="also time calibration steps (Sparge Calibrate)")
    args = ap.parse_args()
    from sparge_attention.nodes.config import SpargeConfig
    from sparge_attention.nodes.override import SpargeOverride
    from sparge_attention.nodes.stats import RunStats, fold_forward
    from sparge_attention.nodes.readout import build_readout

    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "models": {}}
    for name in args.models.split(","):
        dm, x, t, ctx, heads, D, N, note = wan_inputs(name, dev)
        r = res["models"][name] = {"layers": note, "tokens": N, "heads": heads, "rows": []}
        # attention alone, for the Amdahl bound: one self-attention call at this shape
        qa, ka, va = (torch.randn(2, heads, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        t_attn_cudnn = bench_ms(lambda: sdpa_cudnn(qa, ka, va))
        del qa, ka, va
        t_default = step_time(dm, x, t, ctx, dict, args.steps)
        t_floor = step_time(dm, x, t, ctx, lambda: {"optimized_attention_override": floor_override}, args.steps)
        r.update(default_s=t_default, floor_s=t_floor, attention_share=1 - t_floor / t_default,
                 attn_call_cudnn_ms=t_attn_cudnn)
        print(f"\n{name} ({note}, {N} tokens, batch 2): default {t_default:.3f} s/step, floor {t_floor:.3f} s "
              f"(self-attention {100 * (1 - t_floor / t_default):.0f}%)")
        print(f"{'setting':<22} {'s/step':>7} {'speed-up':>8} {'sparsity':>8} {'attn x cuDNN':>12} {'bound':>6} {'of bound':>8}")
        settings = [(p, SpargeConfig.from_widgets(preset=p, min_tokens=1024, verbose=True))
                    for p in ("Quality", "Balanced", "Fast", "Turbo")]
        settings.append(("top-k 0.25", SpargeConfig.from_widgets(preset="Custom", mode="topk", topk=0.25,
                                                                simthreshd1=-1.0, min_tokens=1024, verbose=True)))
        for label, cfg in settings:
            ov = SpargeOverride(cfg)
            ov.run = RunStats()
            base = SimpleNamespace(diffusion_model=dm)

            def to_factory(ov=ov, base=base):
                to = {"optimized_attention_override": ov}
                to[ov.key] = ov.forward_context(base, x, ctx, to)
                return to

            # after each forward, fold its stats into the run as the APPLY_MODEL wrapper does
            ts_med = step_time(dm, x, t, ctx, to_factory, args.steps, after=lambda to, ov=ov: fold_forward(ov.run, to[ov.key]))
            ro = build_readout(ov, ov.run)
            calls = ro.get("sparse_calls") or 0
            attn_ms = ro.get("attention_time_ms")
            # attention ratio measured in this run: mean sparse call vs one cuDNN call of the same shape
            ratio = (attn_ms / calls / t_attn_cudnn) if (attn_ms and calls) else None
            bound = t_default / (t_floor + (t_default - t_floor) * ratio) if ratio else None
            speed = t_default / ts_med
            row = {"setting": label, "s_per_step": ts_med, "speedup": speed, "sparsity": ro.get("sparsity"),
                   "attn_x_cudnn": ratio, "bound": bound, "of_bound": speed / bound if bound else None,
                   "dense_calls": ro.get("dense_calls"), "settings": cfg.describe()}
            r["rows"].append(row)
            print(f"{label:<22} {ts_med:7.3f} {speed:8.2f} {ro.get('sparsity') or 0:8.3f} "
                  f"{ratio or float('nan'):12.3f} {bound or float('nan'):6.2f} {row['of_bound'] or float('nan'):8.2f}")
        if args.calibrate and name == "wan13b_480":  # the issue asks for the 1.3B at 480p
            r["calibration"] = calibration_rows(dm, x, t, ctx, grid_of(name), heads, t_default, args.steps)
        del dm, x, ctx
        torch.cuda.empty_cache()
    print("saved", save(res, f"{res['date']}-{card_name()}-e2e"))


if __name__ == "__main__":
    main()
