"""A sampling run driven through an attention override's model wrappers the way ComfyUI 0.3.75
calls them: OUTER_SAMPLE around the run, APPLY_MODEL around each forward (shared/COMFYUI.md),
without ComfyUI's sampler. Used by the in-process tests and the end-to-end benches."""
from types import SimpleNamespace

import torch


class Executor:
    """What ComfyUI's wrapper executors look like to a wrapper: callable, with class_obj."""

    def __init__(self, fn, class_obj):
        self.fn, self.class_obj = fn, class_obj

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def sampling_run(ov, forward, diffusion_model, x, steps: int, t=None, context=None, around_forward=None):
    """`steps` forwards of forward(x, t, c_concat, c_crossattn, control, transformer_options) inside
    one run of `ov`'s wrappers, sigmas evenly from 1 to 0. `around_forward(i)`, if given, is a
    context manager entered around forward i (e.g. a sync check)."""
    base = SimpleNamespace(diffusion_model=diffusion_model)

    def sample(noise, latent, sampler, sigmas):
        for i in range(steps):
            to = {"optimized_attention_override": ov, "sigmas": sigmas[i:i + 1], "sample_sigmas": sigmas}
            if around_forward is None:
                ov.apply_model_wrapper(Executor(forward, base), x, t, None, context, None, to)
            else:
                with around_forward(i):
                    ov.apply_model_wrapper(Executor(forward, base), x, t, None, context, None, to)

    ov.outer_sample_wrapper(Executor(sample, SimpleNamespace()), None, None, None, torch.linspace(1.0, 0.0, steps + 1))
