"""Launching a @triton.jit kernel with less host time per launch (issue 14: host time per call).

`kernel[grid](*args)` runs Triton's JITFunction.run on every launch: environment knobs, device and
stream lookups, the argument binder, a cache key built with str(options), checks of the globals the
kernel read, launch metadata for the profiler hooks, then the compiled kernel's launcher. A sparse
call makes 8 launches, and at 7,800 tokens the GPU waits on them.

Of all that, only the binder decides which compiled kernel an argument list needs: it applies
Triton's own specialization rules (each argument's type, ints equal to 1 or divisible by 16,
pointer alignment) in its C++ code. `Kernel` keeps the binder and replaces the rest with one dict
lookup keyed on the binder's answer: the first launch of each specialization goes through Triton
(it compiles or loads, caches and launches), later ones call that compiled kernel's launcher
directly with the bound arguments, as JITFunction.run itself ends.

It launches through JITFunction.run instead, always, under the interpreter, on a Triton whose
internals differ from the ones used here (found on the first launch), and while a profiler's
launch hook or a pass-pipeline hook is set.

Inside `addresses_unchecked()` the launcher gets each tensor argument's address as a plain int.
Otherwise it asks the driver about every address (cuPointerGetAttribute), which refuses what a CUDA
graph capture allocates under cudaMallocAsync: graph memory, mapped only when the graph launches.
A launch there that would go through Triton's own path raises instead (it would run that check).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import triton

try:
    from triton import knobs as _knobs  # Triton >= 3.4
except ImportError:  # older Triton: no hook chains to respect, and no direct launch either
    _knobs = None


_unchecked = threading.local()


class NotLaunchedYet(RuntimeError):
    """A first launch of a kernel's specialization inside addresses_unchecked(): it must run once
    outside a capture first (Triton compiles or loads it there, checking its addresses)."""


@contextmanager
def addresses_unchecked():
    """Launches in this thread pass their tensors' addresses unchecked (see the module docstring):
    for a CUDA graph capture, whose tensors the caller knows to be on the device."""
    before = getattr(_unchecked, "on", False)
    _unchecked.on = True
    try:
        yield
    finally:
        _unchecked.on = before


def _key(device, specialization, options) -> tuple:
    """The compiled-kernel cache key of one binder answer (the same in `launch` and `_first`)."""
    return device, tuple(specialization), tuple(options.items())


def _hooks_active() -> bool:
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and (not hasattr(hook, "calls") or hook.calls):
            return True
    return getattr(rt, "add_stages_inspection_hook", None) is not None


class Kernel:
    """A @triton.jit function, launched as `Kernel(fn)[grid](*args, **kwargs)` like the function
    itself (grid: a tuple of 1 to 3 ints)."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}  # (device, specialization, options) -> CompiledKernel
        # the interpreter's functions have no binder; neither has a Triton without knobs
        self._direct = _knobs is not None and hasattr(fn, "device_caches")
        self._device = self._stream = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        unchecked = getattr(_unchecked, "on", False)
        if not self._direct or self.fn.pre_run_hooks or _hooks_active():
            if unchecked:
                raise RuntimeError("a launch through Triton's own path inside addresses_unchecked()")
            return self.fn[grid](*args, **kwargs)
        if self._device is None:
            drv = triton.runtime.driver.active
            self._device, self._stream = drv.get_current_device, drv.get_current_stream
        device = self._device()
        caches = self.fn.device_caches.get(device)  # made by the first launch on this device
        if caches is None:
            return self._first(grid, args, kwargs, device, unchecked)
        bound, specialization, options = caches[-1](*args, **kwargs)
        ck = self._compiled.get(_key(device, specialization, options))
        if ck is None:
            return self._first(grid, args, kwargs, device, unchecked)
        vals = bound.values()
        if unchecked:
            vals = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in vals]
        n = len(grid)
        ck.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream(device), ck.function,
               ck.packed_metadata, None, None, None, *vals)
        return ck

    def _first(self, grid, args, kwargs, device, unchecked=False):
        """Triton's own launch; its compiled kernel serves the later launches of the same key. A
        Triton whose binder or compiled kernel is not the one this module knows launches through
        JITFunction.run from then on."""
        if unchecked:
            raise NotLaunchedYet("a first launch of a specialization inside addresses_unchecked()")
        ck = self.fn[grid](*args, **kwargs)
        try:
            bound, specialization, options = self.fn.device_caches[device][-1](*args, **kwargs)
            key = _key(device, specialization, options)
            ok = isinstance(bound, dict) and all(hasattr(ck, a) for a in ("run", "function", "packed_metadata"))
            hash(key)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            ok = False
        if ok:
            self._compiled[key] = ck
        else:
            self._direct = False
        return ck
