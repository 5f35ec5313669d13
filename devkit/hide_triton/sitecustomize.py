"""Hide Triton from a Python process, as on a Windows install without triton-windows or with a
broken Triton (tests/comfy/test_no_triton.py). Put this folder first on PYTHONPATH: Python
imports `sitecustomize` at start-up, before any other code. SPARGE_HIDE_TRITON picks how:

missing         no finder finds triton (or triton.*): `import triton` raises ModuleNotFoundError
                and importlib.util.find_spec("triton") is None, as when it is not installed
broken-import   the package is found, but its import raises ImportError from inside, as a
                Windows install whose compiled part does not load ("DLL load failed")
broken-runtime  the package is found, but its import raises RuntimeError (any non-ImportError)
Test-only (devkit/): never imported by the pack."""
import importlib.abc
import importlib.machinery
import os
import sys

MODE = os.environ.get("SPARGE_HIDE_TRITON", "")
MESSAGES = {
    "broken-import": "DLL load failed while importing libtriton: The specified module could not be found. "
                     "(simulated by devkit/hide_triton)",
    "broken-runtime": "triton failed to initialize (simulated by devkit/hide_triton)",
}


def _is_triton(name: str) -> bool:
    return name == "triton" or name.startswith("triton.")


class _BrokenLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if MODE == "broken-import":
            raise ImportError(MESSAGES[MODE], name="triton._C.libtriton")
        raise RuntimeError(MESSAGES[MODE])


class BrokenTriton(importlib.abc.MetaPathFinder):
    """Finds triton first, with a loader that fails."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, _BrokenLoader()) if _is_triton(name) else None


class WithoutTriton:
    """One of sys.meta_path's finders, blind to triton (everything else is passed through)."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if _is_triton(name) else self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self.inner, attr)


if MODE == "missing" or MODE in MESSAGES:
    for _name in [n for n in sys.modules if _is_triton(n)]:
        del sys.modules[_name]
    if MODE == "missing":
        sys.meta_path[:] = [WithoutTriton(f) for f in sys.meta_path]
    else:
        sys.meta_path.insert(0, BrokenTriton())
elif MODE:
    raise ValueError(f"SPARGE_HIDE_TRITON={MODE!r}: use missing, broken-import or broken-runtime")
