"""Which attention calls run sparse, and how (token grid, key padding); nothing here runs attention.

ComfyUI 0.3.75 calls the override as override(func, q, k, v[, heads], heads=, mask=,
skip_reshape=, skip_output_reshape=, transformer_options=) (shared/COMFYUI.md): q/k/v are
(B, N, H*D) or, with skip_reshape, (B, H, N, D). `read_call` parses that; `dense_reason` says why a
call must stay dense (one of the reasons below, the readout's keys) or None; `backend_reason` whether
the device's sparse kernels can run in this process at all (Triton).
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Optional

import torch

from ..sparge_core.api import MAX_HEAD_DIM, SUPPORTED_DTYPES, resolve_backend
from ..sparge_core.availability import triton_status
from ..sparge_core.layout import split_heads

log = logging.getLogger("sparge_attention")

# dense-fallback reasons (readout keys)
R_CROSS = "cross attention"
R_SHORT = "short"
R_SCHEDULE = "schedule"
R_DENSE_BLOCK = "dense block"
R_MASK = "mask"
R_DTYPE = "dtype"
R_HEAD_DIM = "head dim"
R_SHAPE = "unsupported call"
R_KERNEL = "kernel error"
R_PROFILE_DENSE = "profile dense layer"  # a loaded profile keeps every head of this block dense
R_NO_TRITON = "no triton"  # a CUDA GPU where Triton does not import: the sparse kernels cannot run

# why Hilbert order was not used on a sparse call
H_OFF = "off"
H_NO_GRID = "no grid"
H_MISMATCH = "grid mismatch"
H_MASK = "mask on grid tokens"


class Call(NamedTuple):
    """An attention call as ComfyUI made it, with its sizes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads_split: bool  # skip_reshape: q/k/v are (B, H, N, D)
    merge_out: bool  # not skip_output_reshape: return (B, N, H*D)
    B: int
    H: int
    N: int
    Nk: int
    D: int
    flops: float  # 4 B H N Nk D

    def split(self):
        """q, k, v as (B, H, N, D)."""
        if self.heads_split:
            return self.q, self.k, self.v
        return split_heads(self.q, self.H), split_heads(self.k, self.H), split_heads(self.v, self.H)


def read_call(args, kwargs) -> tuple[Optional[Call], Optional[str]]:
    """(Call, None) for a self-attention call the override can read; (None or Call, reason) else."""
    # asked on every attention call: each tensor's shape is read once (a Size per read)
    if len(args) < 3:
        return None, R_SHAPE
    q, k, v = args[0], args[1], args[2]
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None, R_SHAPE
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    split = bool(kwargs.get("skip_reshape", False))
    qs, ks = q.shape, k.shape
    if split:
        if len(qs) != 4 or len(ks) != 4 or v.dim() != 4:
            return None, R_SHAPE
        B, H, N, D = qs
        Nk = ks[2]
    else:
        if len(qs) != 3 or len(ks) != 3 or v.dim() != 3 or not isinstance(heads, int) or heads <= 0 \
                or qs[2] % heads:
            return None, R_SHAPE
        B, N, C = qs
        H, D = heads, C // heads
        Nk = ks[1]
    call = Call(q, k, v, split, not bool(kwargs.get("skip_output_reshape", False)), B, H, N, Nk, D,
                4.0 * B * H * N * Nk * D)
    return call, (R_CROSS if Nk != N else None)


def dense_reason(call: Call, cfg, sparse_on: bool, layer: Optional[int], block_q: int) -> Optional[str]:
    """Why a self-attention call runs dense (before its mask is looked at), or None."""
    q, k, v = call.q, call.k, call.v
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return R_DTYPE
    if call.heads_split:
        bad = k.shape[1] != call.H or v.shape != k.shape
    else:
        bad = k.shape != v.shape or k.shape[-1] != q.shape[-1]
    if bad:
        return R_SHAPE
    if call.D > MAX_HEAD_DIM:
        return R_HEAD_DIM
    if call.N < max(cfg.min_tokens, block_q):
        return R_SHORT
    if not sparse_on:
        return R_SCHEDULE
    if layer is not None and layer in cfg.dense_blocks:
        return R_DENSE_BLOCK
    return None


@torch.compiler.assume_constant_result  # a compiled model asks once, while it is traced
def backend_reason(device_type: str) -> Optional[str]:
    """See _backend_reason. This plain wrapper is what torch.compile sees: dynamo traces into an
    lru_cache object instead of taking its result as a constant (a graph break under fullgraph)."""
    return _backend_reason(device_type)


@functools.lru_cache(maxsize=None)  # asked on every attention call; the answer never changes in a process
def _backend_reason(device_type: str) -> Optional[str]:
    """R_NO_TRITON when a call on this device would run the Triton kernels but Triton does not
    import here (sparge_core.availability), else None. The first time (the only time it is worked
    out), the log says what is missing and how to fix it: a warning on a CUDA GPU; a note elsewhere
    (the CPU runs the PyTorch reference, which needs no Triton), unless this torch has no CUDA at all."""
    on_gpu = resolve_backend(torch.device(device_type), "auto") == "triton"
    if not on_gpu and not torch.backends.cuda.is_built():
        return None
    st = triton_status()
    if st.available:
        return None
    if on_gpu:
        log.warning("Sparge Attention: %s, so its sparse kernels cannot run on this GPU: attention runs "
                    "dense (ComfyUI's own), counted as '%s' in the readout. Fix: %s.", st.reason, R_NO_TRITON,
                    st.fix)
    else:
        log.info("Sparge Attention: %s. Not needed on the %s (the node runs its PyTorch reference there), but "
                 "on a CUDA GPU attention would run dense. Fix: %s.", st.reason, device_type, st.fix)
    return R_NO_TRITON if on_gpu else None


def triton_note(no_triton_calls: int, ran_reference: bool) -> Optional[str]:
    """The readout's note on a missing Triton, or None (it imports, or cannot matter to this run)."""
    if not no_triton_calls and not (ran_reference and torch.backends.cuda.is_built()):
        return None
    st = triton_status()
    if st.available:
        return None
    if no_triton_calls:
        return f"{no_triton_calls} calls ran dense ('{R_NO_TRITON}'): {st.reason}. Fix: {st.fix}"
    return f"{st.reason}: not needed by this run (PyTorch reference), but on a CUDA GPU attention would run dense"


def layer_index(ctx, to) -> Optional[int]:
    """Transformer block index of a self-attention call: HunyuanVideo-style block_index (double
    blocks first, then single blocks), else the count of self-attention calls so far in this
    forward (Wan 0.3.75 passes no block index)."""
    if isinstance(to, dict) and isinstance(to.get("block_index"), int):
        idx = to["block_index"]
        if to.get("block_type") == "single":
            idx += ctx.n_double if ctx is not None else 0
    elif ctx is not None:
        idx = ctx.self_attn_calls
    else:
        return None
    if ctx is not None:
        ctx.self_attn_calls += 1
        ctx.max_layer = max(ctx.max_layer, idx)
    return idx


def grid_for(hilbert: bool, ctx, n: int, to):
    """(grid, text tokens after it, None) for Hilbert order, or (None, None, why not)."""
    if not hilbert:
        return None, None, H_OFF
    if ctx is None or not ctx.grids:
        return None, None, H_NO_GRID
    joint = isinstance(to, dict) and to.get("block_type") in ("double", "single")
    for g in ctx.grids:
        n_grid = g[0] * g[1] * g[2]
        if n == n_grid:
            return g, 0, None
        if joint and ctx.context_tokens is not None and n == n_grid + ctx.context_tokens:
            return g, ctx.context_tokens, None  # image tokens first, text tokens stay in place
    return None, None, H_MISMATCH


def grid_keys_kept(keep_keys, grid) -> bool:
    """Does key padding leave every grid token (the first t*h*w keys) in place?"""
    n_grid = grid[0] * grid[1] * grid[2]
    for idx in keep_keys[1]:
        if idx.numel() < n_grid or int(idx[n_grid - 1]) != n_grid - 1:
            return False
    return True


@torch.compiler.disable
def key_padding(mask, B: int, Nk: int, cache: dict):
    """A mask that only removes keys (same for every query and head), e.g. HunyuanVideo's text
    padding: attention over the remaining keys is exactly the same thing. Returns ("shared" |
    "per_item", index lists) -- one list for all batch items or one per item -- or None when the
    mask is anything else (then the call runs dense). Cached per forward by the mask's storage."""
    ck = (mask.data_ptr(), tuple(mask.shape), str(mask.dtype), B, Nk)
    if ck in cache:
        return cache[ck]
    res = None
    m = mask
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1 and m.shape[3] == Nk and m.shape[0] in (1, B):
        row = m[:, 0, 0, :]
        if row.dtype == torch.bool:
            keep = row
            pure = True
        else:
            rf = row.float()
            keep = rf == 0
            pure = bool(((rf == 0) | (rf <= -1e4)).all())
        if pure and bool(keep.any(dim=-1).all()):
            lists = [keep[i].nonzero().flatten() for i in range(keep.shape[0])]
            res = ("shared" if keep.shape[0] == 1 else "per_item", lists)
    cache[ck] = res
    return res


def describe_call(args, kwargs) -> str:
    """A call in one line, for the verbose log of the first dense call of each reason."""
    shapes = [tuple(a.shape) for a in args[:3] if isinstance(a, torch.Tensor)]
    extra = {k: kwargs[k] for k in ("heads", "skip_reshape", "skip_output_reshape") if k in kwargs}
    to = kwargs.get("transformer_options") or {}
    for k in ("block_type", "block_index"):
        if k in to:
            extra[k] = to[k]
    if kwargs.get("mask") is not None:
        extra["mask"] = tuple(kwargs["mask"].shape)
    return f"q/k/v {shapes} {extra}"
