"""Fixtures of the ComfyUI tests (the harness itself is devkit/comfy_harness.py)."""
import pytest

from devkit.comfy_harness import ComfyServer


@pytest.fixture(scope="module")
def comfy_server():
    """Module-scoped real ComfyUI server with the tiny models in models/diffusion_models/."""
    with ComfyServer(install_tiny_models=True) as srv:
        yield srv
