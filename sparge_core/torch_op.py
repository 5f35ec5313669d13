"""sparge_attention as a torch custom op ("sparge::attention"), so torch.compile can trace
through code that calls it (a ComfyUI model compiled after the Sparge Attention node).

The op is opaque to the compiler: its real implementation runs eagerly (Triton on CUDA, the
PyTorch reference elsewhere) and `register_fake` tells the compiler the output shapes. It
returns the per-call counts as 0-dim int64 tensors on q's device, so the caller can sum them
without a host sync and without a graph break.

    out, kept, pv_skipped = torch.ops.sparge.attention(
        q, k, v,                       # (B, H, N, D), k/v (B, Hkv, Nk, D)
        simthreshd1, threshold, pvthreshd,   # (H,) float32 tensors (CPU is best: no GPU sync)
        mode,                          # "cdf", "topk" or "share" (threshold = cdfthreshd, topk or minshare)
        causal, grid, scale,           # grid = [] or [t, h, w]; scale <= 0 means D ** -0.5
        scoring,                       # stage-1 scoring: "pooled" or "lse" (SpargeParams.scoring)
        fill_skipped)                  # estimate the skipped blocks (SpargeParams.fill_skipped; lse only)

`out` is contiguous (B, H, N, D); `call` outside tracing returns the Triton kernel's token-major
output as it is ((B, N, H, D) memory, as flash attention returns it). `kept` counts computed
query-block x key-block pairs over batch and heads; when the call ran dense inside sparge_attention
(e.g. shorter than one block) it equals the dense total.
Importing this module twice (e.g. as `sparge_core` and as part of the node pack) registers the
op once; the second import reuses it.

"sparge::attention_lse" takes the same arguments and also returns the log-sum-exp, (B, H, N) float32
(sparge_attention's return_lse), which ring attention merges its key shards by (nodes/raylight.py).

"sparge::attention_map" takes the same arguments and also returns the predicted block mask,
(B, H, NQ, NK) bool (True = computed; all True when the call ran dense inside sparge_attention),
in the order the kernel visits tokens (Hilbert order with a grid). The Sparge Attention node
calls it for the one transformer block it captures for the Sparge Sparsity Map node.
"""
from __future__ import annotations

from typing import Sequence

import functools

import torch

from .api import block_sizes, sparge_attention
from .blockmask import block_pairs, num_blocks, pack_mask
from .params import SpargeParams

OP_NAME = "sparge::attention"
MAP_OP_NAME = "sparge::attention_map"
LSE_OP_NAME = "sparge::attention_lse"
BACKEND = "auto"  # the op always picks by device: Triton on CUDA, the reference elsewhere


def _values(t: torch.Tensor):
    """A threshold tensor as a hashable Python value (a float when every head agrees).
    Threshold tensors should live on the CPU: reading them then never waits for the GPU."""
    vals = tuple(float(x) for x in t.detach().flatten().cpu().tolist())
    return vals[0] if vals and all(x == vals[0] for x in vals) else vals


@functools.lru_cache(maxsize=128)
def _params_cached(simthreshd1, threshold, pvthreshd, mode: str, causal: bool, scoring: str,
                   fill_skipped: bool) -> SpargeParams:
    # One SpargeParams per distinct setting: it caches its per-head device tensors, so repeated
    # calls make no host-to-device copies (those would synchronize the stream).
    return SpargeParams.for_mode(mode, threshold, simthreshd1=simthreshd1, pvthreshd=pvthreshd, is_causal=causal,
                                 scoring=scoring, fill_skipped=fill_skipped)


def _params(simthreshd1: torch.Tensor, threshold: torch.Tensor, pvthreshd: torch.Tensor, mode: str,
            causal: bool, scoring: str, fill_skipped: bool) -> SpargeParams:
    return _params_cached(_values(simthreshd1), _values(threshold), _values(pvthreshd), mode, bool(causal), scoring, bool(fill_skipped))


def dense_block_total(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query-block x key-block pairs a dense call computes (B * H * NQ * NK) on q's device."""
    B, H, N, _ = q.shape
    return block_pairs(B, H, N, k.shape[2], *block_sizes(q.device))


def _run(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped, lse=False):
    params = _params(simthreshd1, threshold, pvthreshd, mode, causal, scoring, fill_skipped)
    grid = tuple(int(g) for g in grid) or None
    return sparge_attention(q, k, v, params, layout="HND", grid=grid, scale=None if scale <= 0 else float(scale),
                            return_stats=True, backend=BACKEND, return_lse=lse)


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, simthreshd1: torch.Tensor,
                    threshold: torch.Tensor, pvthreshd: torch.Tensor, mode: str, causal: bool,
                    grid: Sequence[int], scale: float, scoring: str,
                    fill_skipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, stats = _run(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped)
    return _outputs(q, k, v, out, stats, op=True)


def _outputs(q, k, v, out, stats, op: bool = False):
    dev = q.device
    # counts stay on q's device and are never copied from the host (no stream sync per call)
    if stats.backend == "dense":
        kept = torch.full((), dense_block_total(q, k), dtype=torch.int64, device=dev)
        skipped = torch.zeros((), dtype=torch.int64, device=dev)
    else:
        kept = _device_count(stats.kept_blocks, dev)
        skipped = _device_count(stats.pv_skipped, dev)
    if op:
        # the registered ops return what their fake says, contiguous (B, H, N, D): compiled graphs
        # check it, and graphs cached on disk by an earlier version of the pack still expect it.
        # Outside tracing (`call`) the Triton kernel's token-major output is kept as it is: the
        # node's merge back to (B, N, H*D) is then a view instead of a copy of the output.
        out = out.contiguous()
    if _aliases(out, (q, k, v)):  # custom ops must not return views of their inputs
        out = out.clone()
    return out, kept, skipped


def mask_shape(q: torch.Tensor, k: torch.Tensor) -> tuple:
    """(B, H, NQ, NK) of the block mask a call on q, k predicts (the sizes of its device)."""
    bq, bk = block_sizes(q.device)
    return (q.shape[0], q.shape[1], num_blocks(q.shape[2], bq), num_blocks(k.shape[2], bk))


def _attention_map_impl(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped):
    out, stats = _run(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped)
    return (*_outputs(q, k, v, out, stats, op=True), _mask_of(q, k, stats))


def _mask_of(q, k, stats) -> torch.Tensor:
    """The call's block mask, (B, H, NQ, NK) bool, True = computed."""
    if stats.block_mask is not None:
        return stats.block_mask.to_dense().contiguous()  # to_dense slices off a spare column
    return torch.ones(mask_shape(q, k), dtype=torch.bool, device=q.device)  # ran dense: every block


def _attention_lse_impl(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped):
    out, lse, stats = _run(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring,
                           fill_skipped, lse=True)
    return (*_outputs(q, k, v, out, stats, op=True), lse.float().contiguous())


def _device_count(x, dev) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dev, torch.int64).reshape(())
    return torch.full((), int(x), dtype=torch.int64, device=dev)


def _aliases(out: torch.Tensor, inputs) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in inputs)


def _attention_fake(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((), dtype=torch.int64), q.new_empty((), dtype=torch.int64)


def _attention_map_fake(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped):
    out, kept, skipped = _attention_fake(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped)
    return out, kept, skipped, q.new_empty(mask_shape(q, k), dtype=torch.bool)


def _attention_lse_fake(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped):
    out, kept, skipped = _attention_fake(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped)
    return out, kept, skipped, q.new_empty(q.shape[:3], dtype=torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, simthreshd1: torch.Tensor,
              threshold: torch.Tensor, pvthreshd: torch.Tensor, mode: str, causal: bool,
              grid: list[int], scale: float, scoring: str,
              fill_skipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_impl(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring, fill_skipped)


def attention_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, simthreshd1: torch.Tensor,
                  threshold: torch.Tensor, pvthreshd: torch.Tensor, mode: str, causal: bool,
                  grid: list[int], scale: float, scoring: str,
                  fill_skipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_map_impl(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring,
                               fill_skipped)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, simthreshd1: torch.Tensor,
                  threshold: torch.Tensor, pvthreshd: torch.Tensor, mode: str, causal: bool,
                  grid: list[int], scale: float, scoring: str,
                  fill_skipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_lse_impl(q, k, v, simthreshd1, threshold, pvthreshd, mode, causal, grid, scale, scoring,
                               fill_skipped)


def _register(name: str, impl, fake):
    """torch.ops.sparge.<name>, registered once per process (a second import of this module, e.g.
    as sparge_core and as part of the node pack, reuses it)."""
    short = name.split("::")[1]
    try:
        existing = getattr(torch.ops.sparge, short)
    except (AttributeError, RuntimeError):
        existing = None
    if existing is not None:
        return existing
    op = torch.library.custom_op(name, mutates_args=())(impl)
    op.register_fake(fake)
    return getattr(torch.ops.sparge, short)


sparge_attention_op = _register(OP_NAME, attention, _attention_fake)
# The same call that also returns the predicted block mask, (B, H, NQ, NK) bool, True = computed,
# in the order the kernel visits tokens (Hilbert order when a grid is given). The Sparge Attention
# node calls it for one transformer block per step to feed the Sparge Sparsity Map node.
sparge_attention_map_op = _register(MAP_OP_NAME, attention_map, _attention_map_fake)
# The same call that also returns its log-sum-exp, (B, H, N) float32: ring attention's per-shard calls.
sparge_attention_lse_op = _register(LSE_OP_NAME, attention_lse, _attention_lse_fake)


def thresholds(value, heads: int) -> torch.Tensor:
    """A threshold (a float, or per-head values: a calibrated profile) as the (heads,) float32 CPU
    tensor the op takes (inf allowed for pvthreshd)."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().flatten().cpu()
    if t.numel() == 1:
        return t.expand(heads).contiguous()
    if t.numel() != heads:
        raise ValueError(f"{t.numel()} per-head values for a call with {heads} heads")
    return t.contiguous()


def call(q, k, v, params: SpargeParams, grid=None, scale=None, with_mask: bool = False, with_lse: bool = False,
         graphs=None, map_first: bool = False):
    """The op with a SpargeParams (HND layout): (out, kept, pv_skipped), plus the block mask with
    with_mask ("sparge::attention_map"), or only its first batch item's bit-packed (blockmask.pack_mask)
    with map_first (the sparsity map's call: through `graphs` too), or the lse with with_lse
    ("sparge::attention_lse"; one of the three).
    The one way nodes/ and the benches call the op. Outside torch.compile tracing it runs the op's
    implementation directly with `params` (`_eager`): the same results without the dispatcher and
    without rebuilding params from threshold tensors, and a plain call (no mask, no lse) through
    `graphs` (a call_graphs.CallGraphs) when one is given."""
    if with_mask + with_lse + map_first > 1:
        raise ValueError("with_mask, map_first and with_lse: one op returns one of them")
    if params.attention_sink:
        raise ValueError("the sparge ops do not take attention_sink (call sparge_attention instead)")
    if not torch.compiler.is_compiling():
        return _eager(q, k, v, params, grid, scale, with_mask, with_lse, graphs, map_first)
    H = q.shape[1]
    op = (sparge_attention_map_op if with_mask or map_first else sparge_attention_lse_op if with_lse
          else sparge_attention_op)
    res = op(q, k, v, thresholds(params.simthreshd1, H), thresholds(params.threshold, H),
             thresholds(params.pvthreshd, H), params.mode, bool(params.is_causal),
             [int(g) for g in grid] if grid else [], -1.0 if scale is None else float(scale),
             params.scoring, bool(params.fill_skipped))
    return (*res[:3], pack_mask(res[3][0])) if map_first else res


@torch.no_grad()
def _eager(q, k, v, params: SpargeParams, grid, scale, with_mask: bool, with_lse: bool, graphs=None,
           map_first: bool = False):
    """What the ops compute, from `params` itself. Per call this skips the custom op's dispatch
    (autograd and alias checks) and the threshold tensors' round trip (thresholds() here, _values()
    in the op): ~140 us of host time per call together on the dev CPU (bench/host_layers.py)."""
    res = sparge_attention(q, k, v, params, layout="HND", grid=tuple(int(g) for g in grid) if grid else None,
                           scale=scale, return_stats=True, backend=BACKEND, return_lse=with_lse,
                           graphs=None if with_mask or with_lse else graphs, map_first=map_first)
    if with_lse:
        out, lse, stats = res
        return (*_outputs(q, k, v, out, stats), lse.float().contiguous())
    out, stats = res
    if with_mask:
        return (*_outputs(q, k, v, out, stats), _mask_of(q, k, stats))
    if map_first:
        return (*_outputs(q, k, v, out, stats), stats.first_map)
    return _outputs(q, k, v, out, stats)


__all__ = ["sparge_attention_op", "sparge_attention_map_op", "sparge_attention_lse_op", "call", "thresholds",
           "dense_block_total", "mask_shape", "OP_NAME", "MAP_OP_NAME", "LSE_OP_NAME"]
