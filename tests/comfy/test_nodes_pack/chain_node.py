"""Test-only nodes for the Sparge Attention node tests (tests/comfy/test_nodes_*.py).

SpargeTestChainOverride: MODEL -> MODEL that sets an optimized_attention_override of its own,
    counting every call it sees as JSON lines in output/<log_name>.jsonl, then running the
    original attention. Put it BEFORE Sparge Attention: the pack must chain to it for the calls
    it keeps dense.
SpargeTestFailKernel: MODEL -> MODEL that sets transformer_options["sparge_test_fail_kernel"]
    on a clone, making the pack's sparse call raise (tests its "kernel error" fallback).
SpargeTestMaskConditioning: CONDITIONING -> CONDITIONING adding an integer text attention_mask
    (1 = keep) whose last `masked` tokens are padding, as a real HunyuanVideo text encoder does.
"""
import json
import os
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
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["sparge_test_fail_kernel"] = True
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
