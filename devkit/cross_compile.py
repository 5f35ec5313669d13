"""Compile the pack's Triton kernels for a GPU target on a machine without that GPU (or any GPU):
Triton's own ptxas does the work, a stand-in driver answers what JITFunction.run asks before it
compiles, and the launch stops right after the compile. Used by tests/test_gpu_targets.py (shared
memory per GPU family) and bench/ptx_compare.py (did a source change alter a kernel's code).

Import Triton with TRITON_INTERPRET unset (an interpreted @triton.jit cannot compile), in a
process of its own: `use_target` replaces Triton's active driver for the rest of the process."""
import torch


class Compiled(Exception):
    """Stops a launcher right after compiling: there is no GPU to run on."""


def use_target(cc: int):
    """Make Triton compile for compute capability `cc` (e.g. 90) from here on; returns the target."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    target = GPUTarget("cuda", cc, 32)

    class CompileOnlyDriver:  # what JITFunction.run asks of the driver before it compiles
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    return target


def compile_through(jit_fn, launch):
    """Run a launcher that launches jit_fn once; return the kernel Triton compiled for it."""
    import triton

    jit_fn.device_caches.clear()
    jit_fn.device_caches[0]  # builds the binder, which sets jit_fn.compile

    def capture(src, target=None, options=None, _env_vars=None):
        raise Compiled(triton.compile(src, target=target, options=options, _env_vars=_env_vars))

    jit_fn.compile = capture
    try:
        launch()
    except Compiled as done:
        return done.args[0]
    raise RuntimeError("the launcher did not launch its kernel")
