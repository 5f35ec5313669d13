"""Sparse calls through CUDA graphs (call_graphs.py): `graphed_forward` runs sparge_attention's
predicted Triton call through a CallGraphs, which launches, captures or replays it, and
`replay_graphed` replays such a call straight from a model's tensors once it is captured. q, k, v,
the output and the per-head thresholds go in through the graphs' address table
(kernels/caller_addrs.py), so a graph is keyed on layouts and settings only. `measure_graphed`
does the same for the error target's measurement of a call (kernels/sampled_error.py)."""
from __future__ import annotations

from typing import Optional

import torch

from .adapt import kernel_measures
from .blockmask import num_blocks, pack_mask
from .call_graphs import TABLE_SLOTS, CallGraphs, layout_key
from .hilbert import grid_permutations
from .layout import split_heads
from .params import SpargeParams
from .triton_call import triton_forward


THRESHOLD_SLOT = 4  # the address table's first slot of a graphed call's per-head thresholds (0-3: q, k, v, out)


def _addresses(q, k, v, out, thresholds: tuple) -> tuple:
    """A graphed call's address table: q, k, v, out, then its per-head thresholds (name, tensor)."""
    return (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()) + tuple(t.data_ptr() for _, t in thresholds)


def _graph_key(device, lq: tuple, lk: tuple, lv: tuple, scale: float, pv_dtype: str, perm32s: tuple, pkey: tuple,
               map_first: bool):
    """The key of a predicted call's CUDA graph: the layouts of q, k, v (call_graphs.layout_key),
    the settings (params.device_key), the addresses of the cached tensors the graph bakes in
    (the Hilbert permutations), and whether it also writes the first batch item's block mask."""
    return (device, lq, lk, lv, scale, pv_dtype, tuple(p.data_ptr() if p is not None else None for p in perm32s),
            pkey, map_first)


def _split_layout(x: torch.Tensor, heads: int) -> tuple:
    """layout_key of layout.split_heads(x, heads), without making the view: (B, N, H*D) with
    strides (s0, s1, s2) is (B, H, N, D) with strides (s0, D*s2, s1, s2)."""
    B, N, C = x.shape
    s0, s1, s2 = x.stride()
    d = C // heads
    return (B, heads, N, d), (s0, d * s2, s1, s2), x.dtype


def replay_key(q, k, v, params: SpargeParams, heads: Optional[int], grid: Optional[tuple], map_first: bool = False):
    """(the graph key sparge_attention(q, k, v, params, grid=grid, map_first=map_first) captures its
    call under, its (B, H, N, D), its per-head thresholds as params.device_key gives them) from the
    tensors' layouts alone (replay_graphed's q, k, v and heads)."""
    if heads is None:
        lq, lk, lv = layout_key(q), layout_key(k), layout_key(v)
    else:
        lq, lk, lv = _split_layout(q, heads), _split_layout(k, heads), _split_layout(v, heads)
    B, H, N, D = lq[0]
    perm, perm_k = grid_permutations(None if grid is None else tuple(grid), N, lk[0][2], q.device)
    perm32s = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
    pkey, ths = params.device_key(H, q.device)
    return _graph_key(q.device, lq, lk, lv, D ** -0.5, "auto", perm32s, pkey, map_first), lq[0], ths


def _output(q, heads: Optional[int], B: int, H: int, N: int, D: int) -> tuple:
    """(the memory a replayed call writes, the output its caller gets): (B, N, H*D) for a model's
    (B, N, H*D) inputs, else a (B, H, N, D) view of token-major memory."""
    if heads is None:
        out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
        return out, out.transpose(1, 2)
    out = torch.empty(B, N, H * D, dtype=q.dtype, device=q.device)
    return out, out


def _replay_plan(graphs: CallGraphs, q, k, v, params: SpargeParams, heads: Optional[int], grid: Optional[tuple],
                 map_first: bool):
    """replay_key's (key, shape, thresholds) of a call the graphs may replay, or None: q, k, v of
    the wrong rank for `heads`, heads that do not split them, or a call `graphs` does not want."""
    if q.dim() != (4 if heads is None else 3) or not graphs.wants(q, k, v):
        return None
    if heads is not None and (q.shape[-1] % heads or k.shape[-1] != q.shape[-1] or v.shape != k.shape):
        return None
    return replay_key(q, k, v, params, heads, grid, map_first)


def replay_graphed(graphs: CallGraphs, q, k, v, params: SpargeParams, heads: Optional[int] = None,
                   grid: Optional[tuple] = None, map_first: bool = False):
    """The call sparge_attention(q, k, v, params, grid=grid, graphs=graphs, map_first=map_first)
    makes, replayed from `graphs` when it holds that call's graph (a call like it ran through
    `graphs` at least twice): (out, counts), and with map_first the first batch item's packed block
    mask (as sparge_attention's stats.first_map), else None, with nothing run (make the call the
    usual way: it captures).

    A replay needs only the tensors' layouts and addresses: nothing here makes a view, checks the
    inputs again (a graph is captured only by a call that passed them, and its key holds every
    layout and setting they depend on) or builds stats. heads: q, k, v are (B, N, H*D) with that
    many heads (a model's attention inputs before the split), and out is (B, N, H*D); None: they
    are (B, H, N, D) and out is too (a view of token-major memory, as sparge_attention returns it).
    counts: (2,) int64 on q's device, [computed block pairs, P.V-skipped pairs], a view that stays
    valid for the next call_graphs.RING_ROWS calls. Scale D**-0.5, pv_dtype "auto"."""
    plan = _replay_plan(graphs, q, k, v, params, heads, grid, map_first)
    if plan is None:
        return None
    key, (B, H, N, D), thresholds = plan
    dev = q.device
    # the output before the lookup: a call whose graph is not held (the run's first calls) wastes it
    out, res = _output(q, heads, B, H, N, D)
    counts = graphs.replay(key, dev, _addresses(q, k, v, out, thresholds), 2)
    if counts is None:
        return None
    # the graph's own buffer, written again by its next replay: the caller gets a copy
    return (res, counts, graphs.outputs_of(key)[0].clone()) if map_first else (res, counts)


def replay_measured(graphs: CallGraphs, q, k, v, params: SpargeParams, heads: Optional[int], grid: Optional[tuple],
                    count: int, seed: int, acc: Optional[torch.Tensor] = None):
    """replay_graphed's call and measure_graphed's measurement of its output in one graph: one
    replay where the error target's measured calls took two (~50 us of host time less on each,
    bench/NOTES.md). Returns (out, counts) as replay_graphed does and the measurement's acc (as
    measure_graphed returns it); acc None when the measurement cannot run in a graph (the call
    replayed alone: measure it the usual way); None with nothing run when the call's own graph is
    not held yet (a graph is captured only by a call that passed sparge_attention's checks).

    The graph is keyed on the call's key, the rows' count and whether acc is fresh; acc and the
    seed go in through the address table after the thresholds. Like every key, it is launched on
    its first sighting and captured on its second (CallGraphs.run)."""
    plan = _replay_plan(graphs, q, k, v, params, heads, grid, False)
    if plan is None or graphs.outputs_of(plan[0]) is None:
        return None
    key, (B, H, N, D), ths = plan
    dev = q.device
    fresh = acc is None
    if fresh:
        acc = torch.empty(2, H, dtype=torch.float64, device=dev)
    out, res = _output(q, heads, B, H, N, D)
    rows = min(int(count), N)
    sums_slot = THRESHOLD_SLOT + len(ths)
    addresses = _addresses(q, k, v, out, ths) + (acc.data_ptr(), int(seed))
    mkey = ("measured", key, rows, fresh)
    counts = graphs.replay(mkey, dev, addresses, 2)
    if counts is None:  # launched or captured now: everything below is done only then
        views = (q, k, v, res) if heads is None else tuple(split_heads(t, heads) for t in (q, k, v, out))
        if sums_slot + 2 > TABLE_SLOTS or not kernel_measures(*(layout_key(t) for t in views)):
            counts = graphs.replay(key, dev, _addresses(q, k, v, out, ths), 2)
            return None if counts is None else (res, counts, None)
        perm, perm_k = grid_permutations(None if grid is None else tuple(grid), N, views[1].shape[2], dev)
        perms = (perm.perm32, perm_k.perm32) if perm is not None else (None, None)
        sparse = _sparse_body(*views, params, D ** -0.5, "auto", perms, ths, None)

        def body(dst, table):
            from ..kernels.sampled_error import sampled_error_sums

            sparse(dst, table)
            sampled_error_sums(*views, (rows, seed if table is None else None), acc, fresh=fresh, table=table,
                               sums_slot=sums_slot)

        counts = graphs.run(mkey, tuple(p for p in perms if p is not None), body, 2, dev, addresses)
    return res, counts, acc


def _sparse_body(q, k, v, out, params: SpargeParams, scale: float, pv_dtype: str, perms, ths: tuple,
                 packed: Optional[torch.Tensor]):
    """body(dst, addrs) of a predicted call for CallGraphs.run: its kernels on q, k, v (B, H, N, D)
    into out, the counts [kept, P.V-skipped] into dst, the packed map into `packed` when given.
    With an address table the thresholds come from its slots THRESHOLD_SLOT on (ths: their names)."""
    H = q.shape[1]

    def body(dst, addrs):
        staged = None
        if addrs is not None:  # this call's thresholds, wherever they lie, into the graph's own rows
            from ..kernels.caller_addrs import pull_values

            rows = torch.empty(len(ths), H, dtype=torch.float32, device=q.device)
            pull_values(addrs, THRESHOLD_SLOT, rows)
            staged = {name: rows[i] for i, (name, _) in enumerate(ths)}
        _, bm, skipped, _ = triton_forward(q, k, v, params, scale, None, pv_dtype, *perms, out=out,
                                           addrs=addrs, staged=staged)
        if packed is not None:
            packed.copy_(pack_mask(bm.to_dense()[0]))
        dst[0].copy_(bm.kv_num_blocks.sum())  # device to device: a capture allows no host copy
        if isinstance(skipped, torch.Tensor):
            dst[1].copy_(skipped)
        else:
            dst[1].zero_()
    return body


def graphed_forward(graphs: CallGraphs, q, k, v, params: SpargeParams, scale: float, pv_dtype: str, perms,
                    map_first: bool = False):
    """The predicted Triton call through `graphs` (call_graphs.py): (out, counts), counts a (2,)
    int64 device tensor [kept, P.V-skipped]. q, k, v, the output and the per-head thresholds are
    not baked into a graph: its kernels read their addresses from the graphs' address table, so
    the key holds only their shapes, strides and dtypes, and the params' settings
    (kernels/caller_addrs.py, SpargeParams.device_key). map_first: a third result, the block mask
    of the first batch item bit-packed (blockmask.pack_mask), written by the graph into a buffer of
    its own (the sparsity map's block: one call per forward, which ran launched before)."""
    B, H, N, D = q.shape
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    pkey, ths = params.device_key(H, q.device)
    key = _graph_key(q.device, layout_key(q), layout_key(k), layout_key(v), scale, pv_dtype, perms, pkey, map_first)
    packed = None
    if map_first:  # allocated before a capture, as every buffer a graph writes and its caller reads
        from ..kernels.config import default_config

        cfg = default_config(q.device)
        packed = torch.empty(H, num_blocks(N, cfg.block_m), -(-num_blocks(k.shape[2], cfg.block_n) // 8),
                             dtype=torch.uint8, device=q.device)

    body = _sparse_body(q, k, v, out, params, scale, pv_dtype, perms, ths, packed)
    counts = graphs.run(key, tuple(p for p in perms if p is not None), body, 2, q.device,
                        _addresses(q, k, v, out, ths), outputs=(packed,) if map_first else ())
    if not map_first:
        return out, counts
    held = graphs.outputs_of(key)  # a graph replayed or captured now writes its own buffer
    return out, counts, (packed if held is None else held[0].clone())


def measure_graphed(graphs: CallGraphs, q, k, v, out, heads: Optional[int], count: int, seed: int,
                    acc: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """adapt.sampled_error of a call through `graphs`, its rows drawn from `seed`: acc ((2, H)
    float64) with the call's sums added, a new one without; None when it cannot run this way
    (nothing ran: measure the usual way). q, k, v, out as in replay_graphed (heads: (B, N, H*D)
    tensors with that many heads, None: (B, H, N, D)). The two kernels read q, k, v, out, acc and
    the seed through the address table, so one graph per layout serves every measured call: a
    replay makes no view and checks nothing (its key holds every layout the kernels depend on),
    where launching them costs ~10 small ops and two launches of host time (bench/NOTES.md v30)."""
    if q.dim() != (4 if heads is None else 3) or out.shape != q.shape or not graphs.wants(q, k, v, out):
        return None
    if heads is None:
        lq, lk, lv, lo = layout_key(q), layout_key(k), layout_key(v), layout_key(out)
    elif q.shape[-1] % heads or k.shape[-1] % heads or v.shape != k.shape:
        return None
    else:
        lq, lk, lv, lo = (_split_layout(t, heads) for t in (q, k, v, out))
    if not kernel_measures(lq, lk, lv, lo):
        return None
    H, N = lq[0][1], lq[0][2]
    fresh = acc is None
    if fresh:
        acc = torch.empty(2, H, dtype=torch.float64, device=q.device)
    rows = min(int(count), N)
    key = ("sampled_error", q.device, lq, lk, lv, lo, rows, fresh)

    def body(dst, table):
        from ..kernels.sampled_error import sampled_error_sums

        views = (q, k, v, out) if heads is None else tuple(split_heads(t, heads) for t in (q, k, v, out))
        sampled_error_sums(*views, (rows, seed if table is None else None), acc, fresh=fresh, table=table)
        dst.zero_()

    graphs.run(key, (), body, 1, q.device, (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), acc.data_ptr(),
                                            int(seed)))
    return acc
