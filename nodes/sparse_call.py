"""The sparse call of one eligible attention call: the op (sparge_core.torch_op.call), over the
keys a key-padding mask keeps. The override calls `run_sparse` through this module, so a test can
make it fail (the override's "kernel error" fallback) without a switch in production code."""
from __future__ import annotations

import torch

from ..sparge_core.params import SpargeParams
from ..sparge_core.torch_op import call as op_call


def run_sparse(qh, kh, vh, params: SpargeParams, grid, keep_keys, want_mask: bool = False, want_lse: bool = False,
               graphs=None):
    """(out, kept, pv_skipped), plus the (B, H, NQ, NK) block mask when want_mask (of the first
    batch item only when each item has its own key padding) or the rows' lse, (B, H, N) float32,
    when want_lse (not both). q/k/v are (B, H, N, D). graphs: the run's CallGraphs, or None."""
    if keep_keys is None:
        return op_call(qh, kh, vh, params, grid, with_mask=want_mask, with_lse=want_lse, graphs=graphs)
    kind, lists = keep_keys
    if kind == "shared":
        idx = lists[0].to(kh.device)
        if idx.numel() == kh.shape[2]:
            return op_call(qh, kh, vh, params, grid, with_mask=want_mask, with_lse=want_lse, graphs=graphs)
        return op_call(qh, kh.index_select(2, idx), vh.index_select(2, idx), params, grid, with_mask=want_mask,
                       with_lse=want_lse, graphs=graphs)
    outs, kept, skipped, extra = [], 0, 0, []
    for b, idx in enumerate(lists):  # each batch item keeps its own keys
        idx = idx.to(kh.device)
        r = op_call(qh[b:b + 1], kh[b:b + 1].index_select(2, idx), vh[b:b + 1].index_select(2, idx), params, grid,
                    with_mask=want_mask and b == 0, with_lse=want_lse, graphs=graphs)
        outs.append(r[0])
        kept, skipped = kept + r[1], skipped + r[2]
        if len(r) > 3:
            extra.append(r[3])
    if want_mask:
        return torch.cat(outs, 0), kept, skipped, extra[0]
    if want_lse:
        return torch.cat(outs, 0), kept, skipped, torch.cat(extra, 0)
    return torch.cat(outs, 0), kept, skipped
