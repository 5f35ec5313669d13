"""Extra GPU memory of one sparse call, beyond q, k, v and the output (issue 14).

Users run 14B models on 24 GB cards: what a call allocates on top of its inputs and output is
what can push a render out of memory. Measured as the peak allocated during the call minus what
was allocated before it minus the output's bytes, for:
- the node's override as ComfyUI calls it ((B, N, H*D) in, the preset with its error-target
  adaptation; a call outside a sampling run is measured, so this includes the exact rows of the
  measurement and is the node's worst case),
- the public API `sparge_attention` on (B, H, N, D) views (no measurement),
- SDPA (cuDNN) on the same views, for scale.
Goal: the node's extra <= the bytes of q + k + v.

    python bench/memory.py [--shapes wan720,hunyuan720] [--preset Balanced]
"""
import argparse
import datetime

import torch

from common import card_name, comfy_sdpa, save
from sparge_attention.nodes.config import SpargeConfig
from sparge_attention.nodes.override import SpargeOverride
from sparge_attention.nodes.stats import ForwardContext
from sparge_attention.sparge_core import sparge_attention
from sparge_attention.sparge_core.presets import PRESETS

SHAPES = {  # name: (B, H, grid, text tokens): Wan 14B 720p 81 frames; HunyuanVideo 720p 129 frames
    "wan720": (2, 40, (21, 45, 80), 0),
    "hunyuan720": (2, 24, (33, 45, 80), 256),
}
D = 128


def extra_bytes(fn):
    """Peak allocated during fn() beyond what was allocated before it and what it returns."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    kept = torch.cuda.memory_allocated() - before  # the output (and anything the call keeps)
    del out
    return peak - before - kept, kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan720,hunyuan720")
    ap.add_argument("--preset", default="Balanced")
    args = ap.parse_args()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "preset": args.preset, "shapes": {}}
    print(f"extra GPU memory of one call (GiB), {res['card']}, preset {args.preset}; goal: node <= q+k+v")
    for name in args.shapes.split(","):
        B, H, grid, text = SHAPES[name]
        n = grid[0] * grid[1] * grid[2] + text
        g = torch.Generator(device="cuda").manual_seed(0)
        x = [torch.randn(B, n, H * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
        qkv = sum(t.numel() * t.element_size() for t in x)
        views = [t.view(B, n, H, D).transpose(1, 2) for t in x]
        cfg = SpargeConfig.from_widgets(preset=args.preset, min_tokens=1024)
        ov = SpargeOverride(cfg, node_id=f"mem-{name}")
        ctx = ForwardContext(0, 1.0, 0.0, True, (grid,), text or None, 0)
        p = PRESETS[args.preset].params()
        rows = {
            "node override (measured call)": lambda: ov(comfy_sdpa, *x, heads=H, transformer_options={ov.key: ctx}),
            "sparge_attention (API)": lambda: sparge_attention(*views, p),
            "SDPA (cuDNN)": lambda: comfy_sdpa(*x, heads=H),
        }
        out = res["shapes"][name] = {"B": B, "H": H, "N": n, "D": D, "qkv_bytes": qkv, "extra_bytes": {}}
        for label, fn in rows.items():
            fn()  # compile, caches
            extra, kept = extra_bytes(fn)
            out["extra_bytes"][label] = extra
            print(f"  {name:<11} N={n:>7} {label:<32} extra {extra / 2**30:6.2f} GiB = {extra / qkv:5.2f} x q+k+v "
                  f"({qkv / 2**30:.2f} GiB); output {kept / 2**30:.2f} GiB")
        del x, views
        torch.cuda.empty_cache()
    print("saved", save(res, f"{res['date']}-{card_name()}-memory"))


if __name__ == "__main__":
    main()
