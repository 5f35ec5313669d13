"""Test-only nodes for the Sparge Attention node tests (tests/comfy/test_nodes_*.py).

SpargeTestChainOverride: MODEL -> MODEL that sets an optimized_attention_override of its own,
    counting every call it sees as JSON lines in output/<log_name>.jsonl, then running the
    original attention. Put it BEFORE Sparge Attention: the pack must chain to it for the calls
    it keeps dense.
SpargeTestFailKernel: MODEL (right after Sparge Attention) -> MODEL whose sampling runs make the
    pack's sparse call raise (tests its "kernel error" fallback); other models are not affected.
SpargeTestMaskConditioning: CONDITIONING -> CONDITIONING adding an integer text attention_mask
    (1 = keep) whose last `masked` tokens are padding, as a real HunyuanVideo text encoder does.
"""
import json
import os
import sys
import threading

import torch


class SpargeTestChainOverride:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "log_name": ("STRING", {"default": "chain"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/sparge"

    def patch(self, model, log_name):
        import folder_paths

        path = os.path.join(folder_paths.get_output_directory(), f"{log_name}.jsonl")
        lock = threading.Lock()
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        prev = to.get("optimized_attention_override")

        def counting_override(func, *args, **kwargs):
            rec = {"shapes": [list(a.shape) for a in args[:3] if isinstance(a, torch.Tensor)],
                   "func": getattr(func, "__name__", str(func))}
            with lock, open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if prev is not None:
                return prev(func, *args, **kwargs)
            return func(*args, **kwargs)

        to["optimized_attention_override"] = counting_override
        return (m,)


class SpargeTestFailKernel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/sparge"

    def patch(self, model):
        from comfy.patcher_extension import WrappersMP

        ov = (model.model_options.get("transformer_options") or {}).get("optimized_attention_override")
        if type(ov).__name__ != "SpargeOverride":
            raise ValueError("SpargeTestFailKernel goes right after a Sparge Attention node")
        # the pack's sparse_call module, under whatever name ComfyUI imported the pack
        mod = sys.modules[type(ov).__module__.rsplit(".", 1)[0] + ".sparse_call"]

        def failing(*args, **kwargs):
            raise RuntimeError("sparse kernel failure injected by SpargeTestFailKernel")

        def during_sampling(executor, *args, **kwargs):
            real = mod.run_sparse
            mod.run_sparse = failing
            try:
                return executor(*args, **kwargs)
            finally:
                mod.run_sparse = real

        m = model.clone()
        m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "sparge_test_fail_kernel", during_sampling)
        return (m,)


class SpargeTestMaskConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",),
                             "masked": ("INT", {"default": 4, "min": 0, "max": 4096})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/sparge"

    def make(self, conditioning, masked):
        out = []
        for cond, extra in conditioning:
            mask = torch.ones(cond.shape[:2], dtype=torch.long)
            if masked:
                mask[:, -masked:] = 0
            out.append([cond, dict(extra, attention_mask=mask)])
        return (out,)


NODE_CLASS_MAPPINGS = {"SpargeTestChainOverride": SpargeTestChainOverride,
                       "SpargeTestFailKernel": SpargeTestFailKernel,
                       "SpargeTestMaskConditioning": SpargeTestMaskConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {k: k for k in NODE_CLASS_MAPPINGS}


def register(class_mappings: dict, display_mappings: dict) -> None:
    class_mappings.update(NODE_CLASS_MAPPINGS)
    display_mappings.update(NODE_DISPLAY_NAME_MAPPINGS)
