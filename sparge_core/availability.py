"""Can the Triton backend run in this process, and if not, why not and what to install.

`triton_status()` is the one place that asks (the node pack and `sparge_attention` both use it).
Triton is imported lazily, so a missing or broken Triton never stops the pack from loading: the
reference backend (CPU) needs none, and `sparge_attention(backend="auto")` on a GPU without it
runs dense attention with the reason in its stats.
"""
from __future__ import annotations

import functools
import importlib.metadata
import re
import sys
from typing import NamedTuple, Optional

import torch


class TritonStatus(NamedTuple):
    available: bool
    reason: Optional[str] = None  # one line with the original error; None when available
    fix: Optional[str] = None  # what to install; None when available


@functools.lru_cache(maxsize=None)  # asked on every GPU attention call; the answer never changes
def triton_status() -> TritonStatus:
    from ..kernels import import_error

    err = import_error()
    if err is None:
        return TritonStatus(True)
    lines = str(err).strip().splitlines()
    text = f": {lines[0][:200]}" if lines else ""
    reason = f"Triton could not be imported ({type(err).__name__}{text})"
    return TritonStatus(False, reason, _fix(reinstall=not isinstance(err, ModuleNotFoundError)))


def _torch_triton_requirement() -> Optional[str]:
    """The Triton pin of the installed torch wheel (e.g. 'triton~=3.8.0'), if its metadata has one."""
    try:
        reqs = importlib.metadata.requires("torch") or []
    except Exception:  # torch not installed as a distribution (a source build, some conda setups)
        return None
    for r in reqs:
        spec = r.split(";")[0].strip()
        if re.split(r"[\s<>=~!\[(]", spec, maxsplit=1)[0].lower() == "triton":
            return spec
    return None


def _fix(reinstall: bool) -> str:
    tv = torch.__version__.split("+")[0]
    where = "into the Python that runs ComfyUI, then restart it"
    if sys.platform == "win32":
        return (f'pip install -U "triton-windows" {where} (pick the triton-windows release its README '
                f"lists for torch {tv})")
    if sys.platform == "darwin":
        return "Triton runs on NVIDIA GPUs (Linux, Windows); on a Mac the node cannot run its kernels"
    req = _torch_triton_requirement()
    force = "--force-reinstall " if reinstall else ""
    if req:
        return f'pip install {force}"{req}" {where} (the Triton torch {tv} was built with)'
    return f"pip install {force}the triton version torch {tv} was built with {where}"
