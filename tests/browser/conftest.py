"""The real ComfyUI servers of the browser tests: one per graph-editor version, shared by the modules
of this folder for the whole session (a server starts in ~15 s on 2 cores).

* ``server``: ComfyUI 0.3.75 with the frontend it pins, 1.32.9 (installed in .venv).
* ``server_158``: the same ComfyUI serving the newest frontend, 1.58.1, that scripts/setup.sh extracts
  to .comfyui/frontend-1.58.1 (``--front-end-root``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import serve  # noqa: E402

from devkit.comfy_harness import FRONTEND_1_58, front_end_args  # noqa: E402


@pytest.fixture(scope="session")
def server():
    with serve() as srv:
        yield srv


@pytest.fixture(scope="session")
def server_158():
    with serve(front_end_args(FRONTEND_1_58)) as srv:
        yield srv
