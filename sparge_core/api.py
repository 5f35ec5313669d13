"""The public entry point: sparge_attention(q, k, v, params, ...)."""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .availability import triton_status
from .blockmask import SpargeBlockMask, causal_block_mask, check_dense_mask, num_blocks
from .call_graphs import CallGraphs, layout_key
from .layout import from_hnd, to_hnd
from .params import SpargeParams
from .reference import FP8_MAX, KMEAN_SAMPLE, LOG2E, expand_kv, pooled_scores, sparge_reference
from .stats import SpargeStats

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


def _thresholds(params: SpargeParams, heads: int, device, staged: Optional[dict]):
    """name -> the (heads,) float32 device tensor of that threshold the kernels read: the params' own
    (per_head), or a graphed call's copies pulled through its address table (staged)."""
    if staged is not None:
        return staged.__getitem__
    return lambda name: params.per_head(name, heads, device)


def prepare_sparse(q, k, v, params: SpargeParams, scale: float, block_mask=None, pv_dtype: str = "auto",
                   perm_q=None, perm_k=None, addrs=None, staged: Optional[dict] = None) -> dict:
    """Everything before the attention kernel on the Triton path: quantization (with the
    Hilbert gather fused in), stage-1 scoring and block selection. Returned as a dict so
    benchmarks can time it on its own. addrs: an int64 device table whose slots 0-2 hold the
    addresses the kernels read q, k, v at (kernels/caller_addrs.py), or None. staged: the per-head
    thresholds to read instead of the params' own (name -> (H,) float32 device tensor), or None."""
    from ..kernels.attn_fwd import FILL_PAD
    from ..kernels.config import default_config
    from ..kernels.kv_stats import kv_stats
    from ..kernels.quantize import quant_pool, quant_v
    from ..kernels.select import select_blocks_fused

    cfg = default_config(q.device)
    B, H, N, D = q.shape
    Nk = k.shape[2]
    hd = 64 if D <= 64 else 128  # other head dims are zero padded; the true scale is kept
    pv_fp8 = cfg.pv_fp8 if pv_dtype == "auto" else pv_dtype == "fp8"
    predict = block_mask is None
    lse = params.scoring == "lse"
    fill = predict and params.fill_skipped  # (fill_skipped implies lse scoring)
    # what stage 1 reads: the lse scores need only the pooled queries (and their self-similarity
    # when the rule is on); the paper's pooled scores need both sides' means and similarities
    q_sim_wanted = predict and (not lse or params.sim_rule_enabled())
    at = (lambda slot: (addrs, slot)) if addrs is not None else (lambda slot: None)
    threshold = _thresholds(params, H, q.device, staged)
    q_i8, q_s, q_pool, q_sim = quant_pool(q, cfg.block_m, hd, extra_scale=scale * LOG2E, want_pool=predict,
                                          want_sim=q_sim_wanted, perm=perm_q, addr=at(0))
    # one pass over V and a sample of K: K's smoothing vector (reference.key_mean, over the keys in
    # the order the kernels visit them) and V's per-channel fp8 scale
    k_mean, v_scale = kv_stats(k, v, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm_k, k_addr=at(1),
                               v_addr=at(2))
    # K's block means: fp32 for the paper's pooled scores, int8 for the fill_skipped estimate's mean keys
    nkc = num_blocks(num_blocks(Nk, cfg.block_n), FILL_PAD) * FILL_PAD if fill else 0  # mean blocks, padded
    k_out = quant_pool(k, cfg.block_n, hd, mean=k_mean, want_pool=predict and not lse,
                       want_sim=predict and not lse, perm=perm_k, pool_i8_blocks=nkc, addr=at(1))
    k_i8, k_s, k_pool, k_sim = k_out[:4]
    v_t = quant_v(v, v_scale, cfg.block_n, hd, pv_fp8, perm=perm_k, mean_blocks=nkc, addr=at(2))
    fill_args = None
    if fill:
        v_t, vbar = v_t
        kbar, kbar_scale = k_out[4]

    if block_mask is None:
        # the similarity rule's threshold: only where a self-similarity was computed
        theta = threshold("simthreshd1")[None, :, None] if (q_sim is not None or not lse) else None
        k_ss = None
        if params.scoring == "lse":
            from ..kernels.block_scores import block_lse_scores

            scores = block_lse_scores(q_pool, k_i8, k_s, scale, Nk, cfg.block_n, want_mean=fill)
            if fill:
                scores, mean = scores
        else:
            k_ss = expand_kv(k_sim[..., None], H)[..., 0] > theta
            scores = pooled_scores(q_pool, k_pool, k_ss, scale)
        sel = threshold(params.threshold_field)
        q_ss = q_sim > theta if q_sim is not None else None  # None: every query block passes
        sel_out = select_blocks_fused(scores, q_ss, k_ss, sel, params.mode, params.attention_sink, params.is_causal,
                                      N, Nk, cfg.block_m, cfg.block_n, fill_mean=mean if fill else None,
                                      fill_blocks=nkc)
        counts, idx = sel_out[:2]
        if fill:
            fill_args = (kbar, kbar_scale, vbar, sel_out[2])
        block_mask = SpargeBlockMask(counts, idx, cfg.block_m, cfg.block_n, N, Nk)
    return dict(cfg=cfg, q_i8=q_i8, k_i8=k_i8, v_t=v_t, q_s=q_s, k_s=k_s, v_scale=v_scale, block_mask=block_mask,
                fill=fill_args, k_mean=k_mean)


def _triton_forward(q, k, v, params: SpargeParams, scale: float, block_mask, pv_dtype: str, perm_q=None, perm_k=None,
                    return_lse: bool = False, out=None, addrs=None, staged: Optional[dict] = None):
    """Returns (out, block mask, P.V-skipped count, lse or None). out: where the kernel writes (see
    kernels.attn_fwd.sparse_attn_fwd), else a new tensor. addrs: an int64 device table of the
    addresses of q, k, v and out (in that order) that the kernels read and write at instead of the
    tensors' own (kernels/caller_addrs.py), or None. staged: see prepare_sparse."""
    from ..kernels.attn_fwd import sparse_attn_fwd

    P = prepare_sparse(q, k, v, params, scale, block_mask, pv_dtype, perm_q, perm_k, addrs, staged)
    cfg, block_mask = P["cfg"], P["block_mask"]
    B, H, N, D = q.shape
    pv_skip = params.pv_skip_enabled()
    # the lse's smoothing shift reads the un-quantized q (rows in the same order as the output)
    lse_inputs = (q if q.stride(-1) == 1 else q.contiguous(), P["k_mean"], scale) if return_lse else None
    pvthreshd = _thresholds(params, H, q.device, staged)("pvthreshd")
    res = sparse_attn_fwd(
        P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], block_mask.kv_num_blocks, block_mask.kv_indices,
        pvthreshd, N, k.shape[2], D, q.dtype, params.is_causal, pv_skip, cfg,
        out_perm=perm_q, fill=P["fill"], lse_inputs=lse_inputs, out=out,
        out_addr=(addrs, 3) if addrs is not None else None,
    )
    skipped = res[1]
    return res[0], block_mask, (skipped.sum() if skipped is not None else 0), (res[2] if return_lse else None)


@functools.lru_cache(maxsize=64)
def _permutations(grid: Optional[tuple], n: int, nk: int, device: torch.device):
    """(the queries' TokenPermutation, the keys') for a grid (None, None without): the keys' is
    another one when a tail of text tokens makes them differ in length. Cached: asked every call."""
    if grid is None:
        return None, None
    from .hilbert import TokenPermutation

    perm = TokenPermutation.for_grid(grid, n, device=device)
    return perm, (perm if nk == n else TokenPermutation.for_grid(grid, nk, device=device))


def _graph_key(device, lq: tuple, lk: tuple, lv: tuple, scale: float, pv_dtype: str, perm32s: tuple, pkey: tuple):
    """The key of a predicted call's CUDA graph: the layouts of q, k, v (call_graphs.layout_key),
    the settings (params.device_key), and the addresses of the cached tensors the graph bakes in
    (the Hilbert permutations)."""
    return (device, lq, lk, lv, scale, pv_dtype, tuple(p.data_ptr() if p is not None else None for p in perm32s),
            pkey)


def _split_layout(x: torch.Tensor, heads: int) -> tuple:
    """layout_key of layout.split_heads(x, heads), without making the view: (B, N, H*D) with
    strides (s0, s1, s2) is (B, H, N, D) with strides (s0, D*s2, s1, s2)."""
    B, N, C = x.shape
    s0, s1, s2 = x.stride()
    d = C // heads
    return (B, heads, N, d), (s0, d * s2, s1, s2), x.dtype


def _replay_key(q, k, v, params: SpargeParams, heads: Optional[int], grid: Optional[tuple]):
    """(the graph key sparge_attention(q, k, v, params, grid=grid) captures its call under, its
    (B, H, N, D), the addresses of its per-head thresholds) from the tensors' layouts alone
    (replay_graphed's q, k, v and heads)."""
    if heads is None:
        lq, lk, lv = layout_key(q), layout_key(k), layout_key(v)
    else:
        lq, lk, lv = _split_layout(q, heads), _split_layout(k, heads), _split_layout(v, heads)
    B, H, N, D = lq[0]
    perm, perm_k = _permutations(None if grid is None else tuple(grid), N, lk[0][2], q.device)
    perm32s = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
    pkey, ths = params.device_key(H, q.device)
    return (_graph_key(q.device, lq, lk, lv, D ** -0.5, "auto", perm32s, pkey), lq[0],
            tuple(t.data_ptr() for _, t in ths))


def replay_graphed(graphs: CallGraphs, q, k, v, params: SpargeParams, heads: Optional[int] = None,
                   grid: Optional[tuple] = None):
    """The call sparge_attention(q, k, v, params, grid=grid, graphs=graphs) makes, replayed from
    `graphs` when it holds that call's graph (a call like it ran through `graphs` at least twice):
    (out, counts), else None, with nothing run (make the call the usual way: it captures).

    A replay needs only the tensors' layouts and addresses: nothing here makes a view, checks the
    inputs again (a graph is captured only by a call that passed them, and its key holds every
    layout and setting they depend on) or builds stats. heads: q, k, v are (B, N, H*D) with that
    many heads (a model's attention inputs before the split), and out is (B, N, H*D); None: they
    are (B, H, N, D) and out is too (a view of token-major memory, as sparge_attention returns it).
    counts: (2,) int64 on q's device, [computed block pairs, P.V-skipped pairs], a view that stays
    valid for the next call_graphs.RING_ROWS calls. Scale D**-0.5, pv_dtype "auto"."""
    if q.dim() != (4 if heads is None else 3) or not graphs.wants(q, k, v):
        return None
    if heads is not None and (q.shape[-1] % heads or k.shape[-1] != q.shape[-1] or v.shape != k.shape):
        return None
    key, (B, H, N, D), thresholds = _replay_key(q, k, v, params, heads, grid)
    dev = q.device
    # the output before the lookup: a call whose graph is not held (the run's first calls) wastes it
    if heads is None:
        out = torch.empty(B, N, H, D, dtype=q.dtype, device=dev)
        res = out.transpose(1, 2)
    else:
        res = out = torch.empty(B, N, H * D, dtype=q.dtype, device=dev)
    counts = graphs.replay(key, dev, (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()) + thresholds, 2)
    return (res, counts) if counts is not None else None


THRESHOLD_SLOT = 4  # the address table's first slot of a graphed call's per-head thresholds (0-3: q, k, v, out)


def _graphed_forward(graphs: CallGraphs, q, k, v, params: SpargeParams, scale: float, pv_dtype: str, perms):
    """The predicted Triton call through `graphs` (call_graphs.py): (out, counts), counts a (2,)
    int64 device tensor [kept, P.V-skipped]. q, k, v, the output and the per-head thresholds are
    not baked into a graph: its kernels read their addresses from the graphs' address table, so
    the key holds only their shapes, strides and dtypes, and the params' settings
    (kernels/caller_addrs.py, SpargeParams.device_key)."""
    B, H, N, D = q.shape
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    pkey, ths = params.device_key(H, q.device)
    perm_q, perm_k = perms
    key = _graph_key(q.device, layout_key(q), layout_key(k), layout_key(v), scale, pv_dtype, perms, pkey)

    def body(dst, addrs):
        staged = None
        if addrs is not None:  # this call's thresholds, wherever they lie, into the graph's own rows
            from ..kernels.caller_addrs import pull_values

            rows = torch.empty(len(ths), H, dtype=torch.float32, device=q.device)
            pull_values(addrs, THRESHOLD_SLOT, rows)
            staged = {name: rows[i] for i, (name, _) in enumerate(ths)}
        _, bm, skipped, _ = _triton_forward(q, k, v, params, scale, None, pv_dtype, perm_q, perm_k, out=out,
                                            addrs=addrs, staged=staged)
        dst[0].copy_(bm.kv_num_blocks.sum())  # device to device: a capture allows no host copy
        if isinstance(skipped, torch.Tensor):
            dst[1].copy_(skipped)
        else:
            dst[1].zero_()

    addresses = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()) + tuple(t.data_ptr() for _, t in ths)
    counts = graphs.run(key, tuple(p for p in perms if p is not None), body, 2, q.device, addresses)
    return out, counts


def sparge_attention(q, k, v, params: Optional[SpargeParams] = None, *, layout: str = "HND",
                     grid: Optional[tuple] = None, n_grid_tokens: Optional[int] = None,
                     scale: Optional[float] = None, return_stats: bool = False, backend: str = "auto",
                     block_mask=None, pv_dtype: str = "auto", return_lse: bool = False,
                     graphs: Optional[CallGraphs] = None):
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
        perm, perm_k = _permutations(grid, N, k.shape[2], q.device)
        if be != "triton":  # the Triton path gathers/scatters inside its kernels instead
            q, k, v = perm.apply(q, 2), perm_k.apply(k, 2), perm_k.apply(v, 2)

    if block_mask is not None:
        block_mask = _as_block_mask(block_mask, B, H, N, k.shape[2], block_q, block_k, q.device)
        if params.is_causal:  # never attend to the future, whatever the mask says
            dense = block_mask.to_dense() & causal_block_mask(*block_mask.kv_indices.shape[2:], block_q, block_k, N, k.shape[2], q.device)
            block_mask = SpargeBlockMask.from_dense(dense, block_q, block_k, N, k.shape[2])

    counts = None  # a graphed call's [kept, P.V-skipped] (it returns no block mask)
    if be == "triton":
        # the quantizers read fp16, bf16 and fp32 alike; the output comes back in q's dtype
        perms = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
        if graphs is not None and block_mask is None and not return_lse and graphs.wants(q, k, v):
            out, counts = _graphed_forward(graphs, q, k, v, params, scale, pv_dtype, perms)
            lse = None
        else:
            out, block_mask, skipped, lse = _triton_forward(q, k, v, params, scale, block_mask, pv_dtype, *perms,
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
    stats = SpargeStats(be, kept, B * H * per_head, skipped, None, block_mask, block_q, block_k, H)
    return _result(out, lse, stats)


def _result(out, lse, stats):
    """out, then lse when asked, then stats when asked (the order sparge_attention documents)."""
    extra = tuple(x for x in (lse, stats) if x is not None)
    return (out,) + extra if extra else out
