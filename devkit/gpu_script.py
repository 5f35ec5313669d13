"""Run a GPU test module's test_* functions without pytest (the device machine may have none):
`python tests/<file>.py` prints PASS / FAIL per test and exits non-zero on a failure.
`compiled_kernels_mark()` is such a module's pytestmark."""
import os
import sys
import traceback


def compiled_kernels_mark():
    """pytest's skip mark for tests that need compiled kernels: a CUDA GPU, not the Triton interpreter
    (the CPU tests cover that). None without pytest (the file then runs as a script)."""
    try:
        import pytest
    except ImportError:
        return None
    import torch

    return pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                              reason="needs a CUDA GPU (compiled kernels)")


def run_tests(namespace: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to run")
        sys.exit(0)
    print(torch.__version__, torch.cuda.get_device_name())
    failed = 0
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                print(f"PASS {name}")
            except Exception as e:  # noqa: BLE001
                failed += 1
                traceback.print_exc()
                print(f"FAIL {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
