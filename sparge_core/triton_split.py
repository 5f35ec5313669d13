"""The split columns for the Triton path, in PyTorch (NOTES v71: a prototype; bench/fill_split_proto.py
times the attention kernel with them). From prepare_sparse's outputs and the raw k and v: the half
tables (reference_split.half_tables' quantities in the kernel's layout: the keys smoothed by the
call's own mean, V over the call's own scale), the halves' biases and each query block's split list
(reference_split.half_biases, split_columns). Here in torch ops over the whole K and V: a fused form
would take the halves' sums inside K's and V's quantizers, which read every key already."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference_predict import key_variances, mean_keys_i8
from .reference_quant import LOG2E, block_token_counts, expand_kv, split_blocks
from .reference_split import half_biases, split_columns


def split_inputs(prepared: dict, k, v, m: int, scale: float, perm_k=None):
    """(fill, fill_split) for kernels.attn_fwd.sparse_attn_fwd: prepared["fill"] with the split
    blocks' biases at -inf, and the split columns of each query block's m skipped blocks of highest
    stage-1 score (2m halves, padded to a power of two >= 32 with -inf biases). prepared: from
    triton_call.prepare_sparse with the fill estimate; k, v (B,Hkv,N,D) as the call got them, perm_k
    its key permutation (int32 (N,) or None)."""
    kbar, kbs, kvar, vbar, bias = prepared["fill"]
    lse, q_pool, v_t = prepared["scores"], prepared["q_pool"], prepared["v_t"]
    block_k = prepared["cfg"].block_n
    B, H, NQ, nk = lse.shape
    hd = kbar.shape[-1]
    if perm_k is not None:
        k, v = (x.index_select(2, perm_k.long()) for x in (k, v))
    n, D = k.shape[2], k.shape[3]
    half = block_k // 2
    ksm = k.float() - prepared["k_mean"][:, :, None, :]
    kh, khs = mean_keys_i8(ksm, half)  # int8 values as floats, one scale per mean
    kvh = key_variances(None, half, k_smooth=ksm)
    vh = split_blocks(v.float() / prepared["v_scale"][:, :, None, :D], half).sum(-2) / \
        block_token_counts(n, half, k.device)[:, None]
    pad = 2 * nk - kh.shape[2]  # a last block of at most half a block: an empty second half
    counts = F.pad(block_token_counts(n, half, k.device), (0, pad))
    kh, kvh, vh = (F.pad(x, (0, 0, 0, pad)) for x in (kh, kvh, vh))
    khs = F.pad(khs, (0, pad))
    hb = half_biases(lse, q_pool.float() * (scale * LOG2E), expand_kv(kh * khs[..., None], H), expand_kv(kvh, H),
                     counts)
    b2, idx, sb = split_columns(lse, bias[..., :nk], hb, m)
    bias = torch.cat([b2, bias[..., nk:]], -1).contiguous()
    S = max(32, 1 << max(idx.shape[-1] - 1, 0).bit_length())
    idx = F.pad(idx, (0, S - idx.shape[-1])).to(torch.int32).contiguous()
    sb = F.pad(sb, (0, S - sb.shape[-1]), value=float("-inf")).float().contiguous()
    tables = (F.pad(kh, (0, hd - D)).to(torch.int8).contiguous(), khs.float().contiguous(),
              kvh.to(torch.float16).contiguous(), F.pad(vh, (0, hd - D)).to(v_t.dtype).contiguous())
    return (kbar, kbs, kvar, vbar, bias), (idx, sb) + tables


def split_forward(q, k, v, params, m: int, scale: float | None = None, pv_dtype: str = "auto", prepared=None):
    """One sparse call on the Triton path with split columns (the prototype's call; no Hilbert order,
    no P.V skip): prepare_sparse, split_inputs, the attention kernel. q, k, v (B,H,N,D) / (B,Hkv,N,D);
    params with fill_skipped. prepared: prepare_sparse's answer for these inputs, where the caller
    has it already. Returns (out (B,H,N,D), prepared, (fill, fill_split))."""
    from ..kernels.attn_fwd import sparse_attn_fwd
    from .reference_predict import FILL_ORDER2_CLAMP
    from .triton_call import prepare_sparse

    if not params.fill_skipped:
        raise ValueError("split columns refine the fill_skipped estimate: params need fill_skipped")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    P = prepare_sparse(q, k, v, params, scale, pv_dtype=pv_dtype) if prepared is None else prepared
    fill, fill_split = split_inputs(P, k, v, m, scale)
    mask = P["block_mask"]
    B, H, N, D = q.shape
    out = sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"], mask.kv_num_blocks,
                          mask.kv_indices, params.per_head("pvthreshd", H, q.device), N, k.shape[2], D, q.dtype,
                          params.is_causal, False, P["cfg"], fill=fill, fill_split=fill_split,
                          fill_clamp=FILL_ORDER2_CLAMP)[0]
    return out, P, (fill, fill_split)
