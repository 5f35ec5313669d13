"""The sparse call of one eligible attention call: a replay of its CUDA graph when the run holds
one (`replay`), else the op (sparge_core.torch_op.call) over the keys a key-padding mask keeps
(`run_sparse`). The override calls both through this module, so a test can make them fail (the
override's "kernel error" fallback) without a switch in production code."""
from __future__ import annotations

import torch

from ..sparge_core.api import block_sizes
from ..sparge_core.blockmask import num_blocks
from ..sparge_core.graphed import replay_graphed, replay_measured
from ..sparge_core.params import SpargeParams
from ..sparge_core.torch_op import call as op_call


def replay(call, params: SpargeParams, grid, graphs, want_map: bool = False, measure=None):
    """(out, counts) of an eligible call without key padding, replayed from the run's CallGraphs
    when it holds the call's graph (sparge_core.graphed.replay_graphed), else None. call: the
    eligibility.Call as ComfyUI made it; out: (B, N, H*D) for (B, N, H*D) inputs, (B, H, N, D) for
    split ones. counts: (2,) int64 on the device, [kept, P.V-skipped]. want_map: plus the sparsity
    map's (packed first-item block mask, key blocks), as run_sparse gives it. measure: an
    observers.GraphMeasure: one more result, last, the measurement's sums when the same graph made
    them (sparge_core.graphed.replay_measured; never with want_map), else None (the call replayed
    alone: measure it the usual way)."""
    heads = None if call.heads_split else call.H
    if measure is not None and not want_map:
        return replay_measured(graphs, call.q, call.k, call.v, params, heads, grid, measure.rows, measure.seed,
                               measure.acc)
    res = replay_graphed(graphs, call.q, call.k, call.v, params, heads, grid, map_first=want_map)
    if res is None:
        return None
    if want_map:
        res = res[0], res[1], _map(res[2], call.Nk, call.q.device)
    return res if measure is None else res + (None,)


def _map(packed: torch.Tensor, keys: int, device) -> tuple:
    """The sparsity map's (packed first-item block mask, key blocks) of a call over `keys` keys."""
    return packed, num_blocks(keys, block_sizes(device)[1])


def _counts(kept, skipped) -> torch.Tensor:
    return torch.stack([kept, skipped])


def run_sparse(qh, kh, vh, params: SpargeParams, grid, keep_keys, want_map: bool = False,
               want_lse: bool = False, graphs=None):
    """(out, counts), plus the sparsity map's (first batch item's block mask bit-packed, (H, NQ,
    ceil(NK / 8)) uint8 (blockmask.pack_mask), its key blocks NK) when want_map, or the rows' lse,
    (B, H, N) float32, when want_lse (not both). q/k/v and out are (B, H, N, D); counts: (2,)
    int64 on the device, [kept, P.V-skipped]. graphs: the run's CallGraphs, or None."""
    if keep_keys is not None and keep_keys[0] == "shared":
        idx = keep_keys[1][0].to(kh.device)
        if idx.numel() != kh.shape[2]:
            kh, vh = kh.index_select(2, idx), vh.index_select(2, idx)
        keep_keys = None
    if keep_keys is None:
        r = op_call(qh, kh, vh, params, grid, map_first=want_map, with_lse=want_lse, graphs=graphs)
        res = (r[0], _counts(r[1], r[2]))
        if want_map:
            return res + (_map(r[3], kh.shape[2], kh.device),)
        return res + tuple(r[3:])
    outs, kept, skipped, extra = [], 0, 0, []
    for b, idx in enumerate(keep_keys[1]):  # each batch item keeps its own keys
        idx = idx.to(kh.device)
        kb = kh[b:b + 1].index_select(2, idx)
        r = op_call(qh[b:b + 1], kb, vh[b:b + 1].index_select(2, idx), params, grid,
                    map_first=want_map and b == 0, with_lse=want_lse, graphs=graphs)
        outs.append(r[0])
        kept, skipped = kept + r[1], skipped + r[2]
        if len(r) > 3:
            extra.append(_map(r[3], kb.shape[2], kb.device) if want_map else r[3])
    res = (torch.cat(outs, 0), _counts(kept, skipped))
    if want_map:
        return res + (extra[0],)
    if want_lse:
        return res + (torch.cat(extra, 0),)
    return res
