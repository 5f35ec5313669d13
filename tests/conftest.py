"""Project-wide pytest configuration.

This machine has no GPU: Triton kernels run in the CPU interpreter, which must be switched on
before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "comfy: starts a real ComfyUI 0.3.75 server (needs `bash scripts/setup.sh`); deselect with -m 'not comfy'",
    )
