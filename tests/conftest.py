"""Project-wide pytest configuration.

This machine has no GPU: Triton kernels run in the CPU interpreter, which must be switched on
before triton is first imported. The repository root goes on sys.path for devkit/ (pack loader,
metrics, realistic inputs, ComfyUI harness), shared with bench/ and scripts/."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ["TRITON_INTERPRET"] == "1":
    from interpreter_patch_once import install  # noqa: E402

    install()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "comfy: starts a real ComfyUI 0.3.75 server (needs `bash scripts/setup.sh`); deselect with -m 'not comfy'",
    )
