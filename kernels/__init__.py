"""Triton kernels of the pack. Only kernels and their thin, input-checking launchers live here.

The kernel modules import triton at their top, so they are imported only on the Triton path;
this package itself and config.py need no Triton. `import_error` says whether they can be
imported here (Triton missing, broken, or too old for an API they use) without raising.
"""
from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=None)  # tried once: a broken Triton fails again on every try, slowly
def import_error() -> Optional[Exception]:
    """None when every kernel module imports, else the exception that stopped it (whatever its type:
    a broken install raises RuntimeError, AttributeError, OSError... from inside triton)."""
    try:
        from . import (attn_fwd, block_index, block_scores, fill_pass, kv_stats, quantize, quantize_v,  # noqa: F401
                       sampled_error, select)
    except Exception as e:
        return e
    return None
