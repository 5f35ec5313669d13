"""The Triton path of a sparse call, kernel by kernel: prediction and quantization
(`prepare_sparse`), then the attention kernel (`triton_forward`). sparge_attention (api.py) calls
it after its checks; a graphed call (graphed.py) runs it inside its CUDA graph."""
from __future__ import annotations

from typing import Optional

from .blockmask import SpargeBlockMask, num_blocks
from .params import SpargeParams
from .reference_predict import FILL_ORDER2_CLAMP, LSE_EXACT_SIM, LSE_KEY_STRIDE, padded_head_dim, pooled_scores
from .reference_quant import FP8_MAX, KMEAN_SAMPLE, LOG2E, V_HEADROOM, expand_kv


def _thresholds(params: SpargeParams, heads: int, device, staged: Optional[dict]):
    """name -> the (heads,) float32 device tensor of that threshold the kernels read: the params' own
    (per_head), or a graphed call's copies pulled through its address table (staged)."""
    if staged is not None:
        return staged.__getitem__
    return lambda name: params.per_head(name, heads, device)


def key_quant_outputs(predict: bool, lse: bool) -> dict:
    """What stage 1 asks of K's quantizer (quant_pool's want_pool, want_sim, want_top, sim_kind):
    the paper's pooled scores need each block's mean and mean pairwise cosine; the lse scores from
    a sample of each block's keys (LSE_KEY_STRIDE > 1) need its top key, which they always read,
    and its keys' self-similarity from the block's sums (energy_similarity: a block below
    LSE_EXACT_SIM is read in full); the lse scores over every key need neither."""
    sampled = predict and lse and LSE_KEY_STRIDE > 1
    return dict(want_pool=predict and not lse, want_sim=predict and (not lse or sampled), want_top=sampled,
                sim_kind="energy" if lse else "cosine")


def key_lse_sampling(k_out) -> dict:
    """The scoring kernel's sampling arguments (block_lse_scores' key_stride, key_top, key_sim,
    exact_below) from what K's quantizer returned for key_quant_outputs(True, True): at
    LSE_KEY_STRIDE > 1 each block's top key (k_out's last) and self-similarity (k_out[3]), for
    the guard that reads blocks below LSE_EXACT_SIM in full; at stride 1 neither."""
    sampled = LSE_KEY_STRIDE > 1
    return dict(key_stride=LSE_KEY_STRIDE, key_top=k_out[-1] if sampled else None,
                key_sim=k_out[3] if sampled else None, exact_below=LSE_EXACT_SIM)


def prepare_sparse(q, k, v, params: SpargeParams, scale: float, block_mask=None, pv_dtype: str = "auto",
                   perm_q=None, perm_k=None, addrs=None, staged: Optional[dict] = None) -> dict:
    """Everything before the attention kernel on the Triton path: quantization (with the
    Hilbert gather fused in), stage-1 scoring and block selection. Returned as a dict so
    benchmarks can time it on its own. addrs: an int64 device table whose slots 0-2 hold the
    addresses the kernels read q, k, v at (kernels/caller_addrs.py), or None. staged: the per-head
    thresholds to read instead of the params' own (name -> (H,) float32 device tensor), or None."""
    from ..kernels.fill_pass import FILL_PAD
    from ..kernels.config import default_config
    from ..kernels.kv_stats import kv_stats
    from ..kernels.quantize import quant_pool
    from ..kernels.quantize_v import quant_v
    from ..kernels.select import select_blocks_fused

    cfg = default_config(q.device)
    B, H, N, D = q.shape
    Nk = k.shape[2]
    hd = padded_head_dim(D)  # other head dims are zero padded; the true scale is kept
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
    # one pass over a sample of K and V: K's smoothing vector (reference_quant.key_mean, over the keys in
    # the order the kernels visit them) and V's per-channel fp8 scale (reference_quant.value_scale, which
    # quant_v checks against every value)
    k_mean, v_scale = kv_stats(k, v, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm_k, k_addr=at(1),
                               v_addr=at(2), v_headroom=V_HEADROOM)
    # K's int8 mean keys for the fill_skipped estimate, and what stage 1 reads (key_quant_outputs)
    nkc = num_blocks(num_blocks(Nk, cfg.block_n), FILL_PAD) * FILL_PAD if fill else 0  # mean blocks, padded
    k_out = quant_pool(k, cfg.block_n, hd, mean=k_mean, perm=perm_k, pool_i8_blocks=nkc, addr=at(1),
                       **key_quant_outputs(predict, lse))
    k_i8, k_s, k_pool, k_sim = k_out[:4]
    v_t = quant_v(v, v_scale, cfg.block_n, hd, pv_fp8, perm=perm_k, mean_blocks=nkc, addr=at(2),
                  rescale_above=FP8_MAX)
    fill_args = None
    if fill:
        v_t, vbar = v_t
        (kbar, kbar_scale), kvar = k_out[4:6]

    if block_mask is None:
        # the similarity rule's threshold: only where a self-similarity was computed
        theta = threshold("simthreshd1")[None, :, None] if (q_sim is not None or not lse) else None
        k_ss = None
        if params.scoring == "lse":
            from ..kernels.block_scores import block_lse_scores

            scores = block_lse_scores(q_pool, k_i8, k_s, scale, Nk, cfg.block_n, want_mean=fill,
                                      kbar=k_out[4] if fill else None, **key_lse_sampling(k_out))
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
            fill_args = (kbar, kbar_scale, kvar, vbar, sel_out[2])
        block_mask = SpargeBlockMask(counts, idx, cfg.block_m, cfg.block_n, N, Nk)
    return dict(cfg=cfg, q_i8=q_i8, k_i8=k_i8, v_t=v_t, q_s=q_s, k_s=k_s, v_scale=v_scale, block_mask=block_mask,
                fill=fill_args, k_mean=k_mean)


def triton_forward(q, k, v, params: SpargeParams, scale: float, block_mask, pv_dtype: str, perm_q=None, perm_k=None,
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
        out_addr=(addrs, 3) if addrs is not None else None, fill_clamp=FILL_ORDER2_CLAMP,
    )
    skipped = res[1]
    return res[0], block_mask, (skipped.sum() if skipped is not None else 0), (res[2] if return_lse else None)
