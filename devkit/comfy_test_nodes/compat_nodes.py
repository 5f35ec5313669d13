"""Test-only nodes for the compatibility tests (tests/comfy/test_compat.py).

SpargeTestDynamoCounters: an output node that reports torch._dynamo's process-wide counters
    (frames compiled, unique graphs, graph breaks, recompiles) in its UI output, so a test can
    tell from the history entry whether torch.compile really compiled something during the
    prompt. Feed it the sampler's LATENT so it runs after sampling; diff two snapshots.
SpargeTestForwardCounter: MODEL -> MODEL adding a DIFFUSION_MODEL wrapper that counts, per
    sigma, the diffusion model forwards that really execute (appends JSON lines to
    output/<log_name>.jsonl). Place it AFTER a step cache node (EasyCache): ComfyUI runs the
    wrappers of one type in the order they were added, the first outermost, so its wrapper is
    then inside EasyCache's and forwards EasyCache skips never reach it.
"""
from .jsonl_log import jsonl_appender


class SpargeTestDynamoCounters:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "label": ("STRING", {"default": "dynamo"})}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "testing/sparge"

    def report(self, samples, label):
        import torch._dynamo.utils as du

        counters = {str(k): {str(kk): int(vv) for kk, vv in v.items()} for k, v in du.counters.items()}
        return {"ui": {"dynamo": [{"label": label, "counters": counters}]}}


class SpargeTestForwardCounter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "log_name": ("STRING", {"default": "forwards"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing/sparge"

    def patch(self, model, log_name):
        from comfy.patcher_extension import WrappersMP

        append = jsonl_appender(log_name)

        def counting(executor, *args, **kwargs):
            to = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options") or {}
            sig = to.get("sigmas")
            rec = {"sigma": float(sig.flatten()[0]) if sig is not None and sig.numel() else None,
                   "batch": int(args[0].shape[0])}
            out = executor(*args, **kwargs)
            append(rec)
            return out

        m = model.clone()
        m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "sparge_test_forward_counter", counting)
        return (m,)


NODE_CLASS_MAPPINGS = {"SpargeTestDynamoCounters": SpargeTestDynamoCounters,
                       "SpargeTestForwardCounter": SpargeTestForwardCounter}
NODE_DISPLAY_NAME_MAPPINGS = {k: k for k in NODE_CLASS_MAPPINGS}


def register(class_mappings: dict, display_mappings: dict) -> None:
    class_mappings.update(NODE_CLASS_MAPPINGS)
    display_mappings.update(NODE_DISPLAY_NAME_MAPPINGS)
