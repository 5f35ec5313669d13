"""Project-wide pytest configuration (keep minimal; kernel tests set TRITON_INTERPRET themselves)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "comfy: starts a real ComfyUI 0.3.75 server (needs `bash scripts/setup.sh`); deselect with -m 'not comfy'",
    )
