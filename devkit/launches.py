"""Record the Triton launches a call of the pack makes: (module attribute, kernel, grid, args,
kwargs) for each, in order, with the arguments as they were before the launch. Used by
bench/launch_cost.py (host time per launch) and tests/test_launch_gpu.py (direct launches against
Triton's own). The kernels' module globals are swapped for recorders while `fn` runs, and put back
after."""
from __future__ import annotations

import torch


def twin_args(args) -> tuple:
    """A copy of a launch's arguments that the kernel sees as the same: every tensor a view of
    the same shape, strides and storage offset into a copy of its storage (so the same pointer
    alignment), tensors that shared a storage sharing its copy. Other arguments as they are (TMA
    descriptors: the attention kernel only reads through them)."""
    storages = {}

    def twin(x):
        if not isinstance(x, torch.Tensor):
            return x
        st = x.untyped_storage()
        key = st.data_ptr()
        if key not in storages:
            storages[key] = st.clone()
        return torch.empty(0, dtype=x.dtype, device=x.device).set_(storages[key], x.storage_offset(), x.size(),
                                                                   x.stride())

    return tuple(twin(a) for a in args)


class _Recorder:
    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.kernel, grid, twin_args(args), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def kernel_modules() -> tuple:
    """Every module of the pack's kernels package, imported: found, not listed, so that a module
    split off later (quantize_v from quantize) is recorded too."""
    import importlib
    import pkgutil

    import sparge_attention.kernels as pkg

    return tuple(importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__))


def capture_launches(fn, modules=None) -> list:
    """Run fn() with the launch sites of `modules` (default: every kernel module of the pack)
    recorded. Only the objects the launchers index (kernels.launch.Kernel instances) are swapped,
    so @triton.jit helpers called from inside kernels stay as they are."""
    if modules is None:
        modules = kernel_modules()
    from sparge_attention.kernels.launch import Kernel

    log: list = []
    swapped = [(m, name, obj) for m in modules for name, obj in vars(m).items() if isinstance(obj, Kernel)]
    for m, name, obj in swapped:
        setattr(m, name, _Recorder(name, obj, log))
    try:
        fn()
    finally:
        for m, name, obj in swapped:
            setattr(m, name, obj)
    return log
