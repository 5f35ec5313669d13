"""Test-only ComfyUI custom nodes for the Sparge Attention test harness.

Loaded by ComfyUI (via a symlink in custom_nodes/) only by the devkit harness (tests, scripts/demo.py);
never shipped to users.

SpargeTestConditioning: a seeded random CONDITIONING of a given width and token count,
standing in for a text encoder (Wan 2.1: width 4096; HunyuanVideo: width 256 + pooled_output 768
for the tiny models in devkit/tiny_models.py). Make negatives with core ConditioningZeroOut.

SpargeTestAttentionProbe: MODEL -> MODEL that logs every attention call reaching ComfyUI's
optimized_attention_override hook (shapes, kwargs, transformer_options keys) to output/<name>.jsonl.
"""
import torch

from .jsonl_log import jsonl_appender


class SpargeTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                "tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
                "pooled_output": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "pooled_width": ("INT", {"default": 768, "min": 1, "max": 16384}),
                "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "make"
    CATEGORY = "testing/sparge"
    DESCRIPTION = "Seeded random text conditioning (test only, replaces a text encoder)."

    def make(self, width, tokens, seed, pooled_output, pooled_width=768, scale=1.0, batch_size=1):
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        cond = torch.randn((batch_size, tokens, width), generator=gen, dtype=torch.float32) * scale
        extra = {}
        if pooled_output:
            extra["pooled_output"] = torch.randn((batch_size, pooled_width), generator=gen, dtype=torch.float32) * scale
        return ([[cond, extra]],)


def _describe(x):
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return type(x).__name__


class SpargeTestAttentionProbe:
    """MODEL -> MODEL: records every attention call ComfyUI routes through
    transformer_options["optimized_attention_override"] as JSON lines in output/<log_name>.jsonl,
    then runs the original attention (chaining to an override set before it, if any)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "log_name": ("STRING", {"default": "attention_probe"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/sparge"

    def patch(self, model, log_name):
        append = jsonl_appender(log_name)
        m = model.clone()
        topts = m.model_options.setdefault("transformer_options", {})
        prev = topts.get("optimized_attention_override")

        def probe(func, *args, **kwargs):
            to = kwargs.get("transformer_options") or {}
            sig = to.get("sigmas")
            rec = {
                "func": getattr(func, "__name__", str(func)),
                "args": [_describe(a) for a in args],
                "kwargs": {k: _describe(v) for k, v in kwargs.items() if k != "transformer_options"},
                "transformer_options_keys": sorted(to.keys()),
                "block_type": to.get("block_type"), "block_index": to.get("block_index"),
                "total_blocks": to.get("total_blocks"),
                "sigma": float(sig.flatten()[0]) if isinstance(sig, torch.Tensor) and sig.numel() else None,
                "chained": prev is not None,
            }
            append(rec)
            if prev is not None:
                return prev(func, *args, **kwargs)
            return func(*args, **kwargs)

        topts["optimized_attention_override"] = probe
        return (m,)


NODE_CLASS_MAPPINGS = {"SpargeTestConditioning": SpargeTestConditioning,
                       "SpargeTestAttentionProbe": SpargeTestAttentionProbe}
NODE_DISPLAY_NAME_MAPPINGS = {"SpargeTestConditioning": "Sparge Test Conditioning (random)",
                              "SpargeTestAttentionProbe": "Sparge Test Attention Probe"}
from .chain_node import register as _register_chain; _register_chain(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)  # noqa: E402,E702
from .compat_nodes import register as _register_compat; _register_compat(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)  # noqa: E402,E702
