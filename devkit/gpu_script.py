"""Run a GPU test module's test_* functions without pytest (the device machine may have none):
`python tests/<file>.py` prints PASS / FAIL per test and exits non-zero on a failure."""
import sys
import traceback


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
