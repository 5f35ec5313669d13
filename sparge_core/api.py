"""The public entry point: sparge_attention(q, k, v, params, ...)."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .availability import triton_status
from .blockmask import SpargeBlockMask, causal_block_mask, check_dense_mask, num_blocks, pack_mask
from .call_graphs import CallGraphs
from .graphed import graphed_forward
from .hilbert import grid_permutations
from .layout import from_hnd, to_hnd
from .params import SpargeParams
from .reference import sparge_reference
from .reference_quant import expand_kv
from .stats import SpargeStats
from .triton_call import triton_forward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
CPU_BLOCKS = (64, 128)  # reference backend: the same blocks as the GPU kernels (kernels/config.py)


def block_sizes(device: torch.device, backend: str = "auto") -> tuple[int, int]:
    """(BLKQ, BLKK) that the mask predictor and the kernel agree on for this device. Asks only the
    kernels' config (no Triton import): a GPU without Triton still gets its sizes for a dense call."""
    if backend == "auto" and device.type != "cuda":  # asked on every call: the common answers first
        return CPU_BLOCKS
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "triton" and not _triton_device(device):
        raise ValueError("the Triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for tests)")
    if backend != "reference":
        from ..kernels.config import default_config

        cfg = default_config(device)
        return cfg.block_m, cfg.block_n
    return CPU_BLOCKS


def _triton_device(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(device: torch.device, backend: str) -> str:
    """The backend a call on `device` runs. "auto" names the one meant for the device (Triton on
    CUDA) whether or not Triton imports here: ask triton_status() for that (sparge_attention runs
    such a call dense). An explicit "triton" that cannot run is a ValueError."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton":
        if not _triton_device(device):
            raise ValueError("the Triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for tests)")
        status = triton_status()
        if not status.available:
            raise ValueError(f"the Triton backend is not available: {status.reason}. Fix: {status.fix}")
    return backend


def validate_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got {getattr(x, 'shape', type(x))}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; supported: fp16, bf16, fp32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"{H} query heads cannot share {k.shape[1]} key/value heads (GQA needs a divisor)")
    if N == 0 or k.shape[2] == 0 or D == 0:
        raise ValueError("empty sequence or head dim")


def _dense(q, k, v, scale, is_causal):
    H = q.shape[1]
    return F.scaled_dot_product_attention(q, expand_kv(k, H), expand_kv(v, H), scale=scale, is_causal=is_causal)


LSE_CHUNK = 1 << 24  # score elements per step of _dense_lse (64 MB of fp32)


def _dense_lse(q, k, scale, is_causal):
    """The exact fp32 log-sum-exp (B,H,N) of the dense fallback's rows: log sum_j exp(scale q.k_j),
    with SDPA's causal mask (top-left aligned: row i sees keys 0..i). Query chunks bound the
    memory: the fallback also takes long sequences (head dims above 128)."""
    B, H, N, _ = q.shape
    Nk = k.shape[2]
    kf = expand_kv(k, H).float()
    step = max(1, LSE_CHUNK // max(1, B * H * Nk))
    parts = []
    for i0 in range(0, N, step):
        s = (q[:, :, i0:i0 + step].float() @ kf.transpose(-1, -2)) * scale
        if is_causal:
            rows = torch.arange(i0, i0 + s.shape[2], device=q.device)
            s = s.masked_fill(torch.arange(Nk, device=q.device)[None, :] > rows[:, None], -math.inf)
        parts.append(torch.logsumexp(s, -1))
    return torch.cat(parts, 2)


def _dense_reason(q, k, params: SpargeParams, block_q: int) -> Optional[str]:
    if q.shape[2] < block_q:
        return f"sequence of {q.shape[2]} tokens is shorter than one {block_q}-token query block: nothing to skip"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the sparse kernel"
    if params.is_causal and q.shape[2] > k.shape[2]:
        return "causal attention with more queries than keys"
    return None


def _as_block_mask(block_mask, B, H, n_q, n_k, block_q, block_k, device) -> SpargeBlockMask:
    if isinstance(block_mask, SpargeBlockMask):
        if (block_mask.block_q, block_mask.block_k) != (block_q, block_k):
            raise ValueError(f"block mask uses {block_mask.block_q}x{block_mask.block_k} blocks; this backend needs {block_q}x{block_k}")
        want = (B, H, num_blocks(n_q, block_q), num_blocks(n_k, block_k))
        if tuple(block_mask.kv_num_blocks.shape) != want[:3] or tuple(block_mask.kv_indices.shape) != want:
            # a wrong key-block count would make the kernel read past the padded K/V
            raise ValueError(f"block mask has shape {tuple(block_mask.kv_indices.shape)}; q/k need {want} (B, H, NQ, NK)")
        return block_mask
    check_dense_mask(block_mask, block_q, block_k, n_q, n_k)
    if block_mask.shape[0] not in (1, B) or block_mask.shape[1] not in (1, H):
        raise ValueError(f"block mask batch/heads {tuple(block_mask.shape[:2])} do not broadcast to ({B}, {H})")
    dense = block_mask.to(device).expand(B, H, -1, -1).contiguous()
    return SpargeBlockMask.from_dense(dense, block_q, block_k, n_q, n_k)


def sparge_attention(q, k, v, params: Optional[SpargeParams] = None, *, layout: str = "HND",
                     grid: Optional[tuple] = None, n_grid_tokens: Optional[int] = None,
                     scale: Optional[float] = None, return_stats: bool = False, backend: str = "auto",
                     block_mask=None, pv_dtype: str = "auto", return_lse: bool = False,
                     graphs: Optional[CallGraphs] = None, map_first: bool = False):
    """Sparse + quantized attention (SpargeAttn).

    q (B, H, N, D), k and v (B, Hkv, Nk, D) for layout "HND"; (B, N, H, D) for "NHD".
    grid: the (t, h, w) token grid of the first t*h*w tokens; when given, q, k and v are
        visited in 3D Hilbert order (tokens after the grid, e.g. text, stay in place).
    block_mask: optional user mask (bool (B|1, H|1, NQ, NK) or SpargeBlockMask) instead of prediction.
    backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton" or "reference".
        "auto" on a GPU where Triton does not import runs dense attention (stats.dense_reason says
        why; availability.triton_status() tells beforehand); an explicit "triton" raises there.
    return_lse: also return lse, float32 (B, H, N) in either layout and in the caller's token
        order: per query row, log sum_j exp(scale * q.k_j) over what the call summed (kept blocks
        exactly, skipped blocks through the fill_skipped estimate, P.V-skipped blocks not at all),
        i.e. the denominator the row was normalized by; the logsumexp of
        torch.ops.aten._scaled_dot_product_flash_attention. -inf for a row that summed nothing.
        Partial results over key shards merge with it (ring attention):
        lse = logaddexp(lse1, lse2), out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse).
    graphs: a CallGraphs (call_graphs.py) that owns CUDA graphs of calls like this one: a call with
        a predicted mask and no lse then replays its graph instead of launching its kernels one by
        one: the same results with much less host time (bench/NOTES.md v26,
        tests/test_call_graphs_gpu.py). Its stats carry no block mask.
    map_first: with return_stats, stats.first_map is the first batch item's block mask, bit-packed
        (blockmask.pack_mask; every block of a call that ran dense), through `graphs` too: the
        node's sparsity map takes one call per forward this way.
    Returns out in q's dtype and layout; (out, lse) with return_lse; (out, stats) with
    return_stats; (out, lse, stats) with both.
    """
    params = SpargeParams() if params is None else params
    if not isinstance(params, SpargeParams):
        raise ValueError("params must be a SpargeParams")
    if pv_dtype not in ("auto", "fp8", "fp16", "fp32"):
        raise ValueError(f"pv_dtype must be auto, fp8, fp16 or fp32, got {pv_dtype!r}")
    q, k, v = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
    validate_qkv(q, k, v)
    B, H, N, D = q.shape
    params.check_heads(H)
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    be = resolve_backend(q.device, backend)
    block_q, block_k = block_sizes(q.device, be)
    if be == "triton" and pv_dtype == "fp32":
        raise ValueError("the Triton backend computes P.V in fp8 or fp16, not fp32")

    reason = _dense_reason(q, k, params, block_q)
    if reason is None and be == "triton" and backend == "auto" and not triton_status().available:
        reason = triton_status().reason  # a GPU without a usable Triton: dense attention, not an error
    if reason is not None:
        out = _dense(q, k, v, scale, params.is_causal)
        lse = _dense_lse(q, k, scale, params.is_causal) if return_lse else None
        stats = SpargeStats("dense", dense_reason=reason, heads=H) if return_stats else None
        if stats is not None and map_first:
            nq, nk = num_blocks(N, block_q), num_blocks(k.shape[2], block_k)
            stats.first_map = pack_mask(torch.ones(H, nq, nk, dtype=torch.bool, device=q.device))
        return _result(from_hnd(out, layout), lse, stats)

    perm = None
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        n_grid = math.prod(grid)
        if n_grid_tokens is not None and n_grid_tokens != n_grid:
            raise ValueError(f"grid {grid} has {n_grid} tokens but n_grid_tokens is {n_grid_tokens}")
        if k.shape[2] < n_grid or N < n_grid:
            raise ValueError(f"grid {grid} has {n_grid} tokens but q has {N} and k {k.shape[2]}")
        # grid tokens come first in q and k alike; the tails (text tokens) may differ in length
        perm, perm_k = grid_permutations(grid, N, k.shape[2], q.device)
        if be != "triton":  # the Triton path gathers/scatters inside its kernels instead
            q, k, v = perm.apply(q, 2), perm_k.apply(k, 2), perm_k.apply(v, 2)

    if block_mask is not None:
        block_mask = _as_block_mask(block_mask, B, H, N, k.shape[2], block_q, block_k, q.device)
        if params.is_causal:  # never attend to the future, whatever the mask says
            dense = block_mask.to_dense() & causal_block_mask(*block_mask.kv_indices.shape[2:], block_q, block_k, N, k.shape[2], q.device)
            block_mask = SpargeBlockMask.from_dense(dense, block_q, block_k, N, k.shape[2])

    counts = first_map = None  # a graphed call's [kept, P.V-skipped] (it returns no block mask) and packed map
    if be == "triton":
        # the quantizers read fp16, bf16 and fp32 alike; the output comes back in q's dtype
        perms = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
        if graphs is not None and block_mask is None and not return_lse and graphs.wants(q, k, v):
            if map_first and return_stats:
                out, counts, first_map = graphed_forward(graphs, q, k, v, params, scale, pv_dtype, perms,
                                                         map_first=True)
            else:
                out, counts = graphed_forward(graphs, q, k, v, params, scale, pv_dtype, perms)
            lse = None
        else:
            out, block_mask, skipped, lse = triton_forward(q, k, v, params, scale, block_mask, pv_dtype, *perms,
                                                            return_lse=return_lse)
    else:
        pvd = "fp16" if pv_dtype == "auto" else pv_dtype
        dense_mask = block_mask.to_dense() if block_mask is not None else None
        res = sparge_reference(q, k, v, params, block_q, block_k, scale, pvd, mask=dense_mask, return_lse=return_lse)
        out, mask, skipped_rows = res[:3]
        lse = res[3] if return_lse else None
        block_mask = SpargeBlockMask.from_dense(mask, block_q, block_k, N, k.shape[2]) if dense_mask is None else block_mask
        skipped = skipped_rows.sum()

    if perm is not None and be != "triton":
        out = perm.invert(out, 2)
        lse = perm.invert(lse, 2) if lse is not None else None
    out = from_hnd(out, layout)
    if not return_stats:
        return _result(out, lse, None)
    nq, nk = num_blocks(N, block_q), num_blocks(k.shape[2], block_k)
    per_head = causal_block_mask(nq, nk, block_q, block_k, N, k.shape[2]).sum().item() if params.is_causal else nq * nk
    if counts is not None:
        kept, skipped = counts[0], counts[1]
    else:
        kept = block_mask.kv_num_blocks.sum()
    if map_first and first_map is None:
        first_map = pack_mask(block_mask.to_dense()[0])
    stats = SpargeStats(be, kept, B * H * per_head, skipped, None, block_mask, block_q, block_k, H,
                        first_map if map_first else None)
    return _result(out, lse, stats)


def _result(out, lse, stats):
    """out, then lse when asked, then stats when asked (the order sparge_attention documents)."""
    extra = tuple(x for x in (lse, stats) if x is not None)
    return (out,) + extra if extra else out
