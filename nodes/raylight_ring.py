"""One ring step of Raylight's USP attention (ring degree > 1), sparse: see nodes/raylight.py.

xfuser's / yunchang's ring loop (ring_flash_attn_forward) calls the per-rank function once per
step with the same q (this ring rank's sequence shard: after the Ulysses all-to-all, ring rank r
holds tokens [r*N/R, (r+1)*N/R) of the padded sequence) and the k/v shard of ring rank
(r - step) mod R (RingComm passes k/v from rank r-1 to r), then merges the steps by their lse.
So each step is its own attention call: the query shard against one key shard, which here runs
through "sparge::attention_lse" (sparge_core/torch_op.py) with the override's eligibility, params,
observers and records, as the override does for a whole call. No Hilbert order: a shard of the
reordered sequence is not the reordered shard. Raylight's pad tokens (the end of the sequence)
sit in the last shard: pad keys are cut off, pad queries get zero rows with lse 0 (finite, so the
merge stays finite; Raylight drops those rows).
"""
from __future__ import annotations

import weakref

import torch

from . import eligibility as E
from .override import CallOptions

H_RING = "ring shard"  # hilbert_not reason: Hilbert order needs the whole sequence


def ring_step(ov, to: dict, state: list, q, k, v, nq: int, nk: int, dense, lses: list, skip: tuple):
    """One ring step through the Sparge override `ov` (SpargeOverride.attend with the lse): q, k, v
    (B, N, h, D) as xfuser hands them over, nq / nk their real (unpadded) rows. `dense(q, k, v)`
    (B, h, n, D) runs xfuser's function and appends its lse to `lses`. `state` ([weakref to q, step,
    layer]) lives for one forward: every step of one ring loop is one transformer block. Observers
    of the classes in `skip` are not asked (RankStats keeps calls that cannot return an lse dense).
    Returns (out (B, N, h, D), lse (B, h, N))."""
    B, N, h, D = q.shape
    ctx = to.get(ov.key)
    first = not state or state[0]() is not q
    layer = E.layer_index(ctx, to) if first else state[2]  # one block: count its first step only
    state[:] = [weakref.ref(q), 0 if first else state[1] + 1, layer]
    args = (q[:, :nq].transpose(1, 2), k[:, :nk].transpose(1, 2), v[:, :nk].transpose(1, 2))
    kwargs = dict(heads=h, skip_reshape=True, skip_output_reshape=True, transformer_options=to)
    out, lse = ov.attend(dense, args, kwargs, CallOptions(layer=layer, with_lse=True, no_hilbert=H_RING, skip=skip,
                                                               key_shard=True))
    if lse is None:  # ran dense
        if not lses:  # an override set before ours ran it without xfuser's function: no lse
            out = dense(*args)
        lse = lses[-1]
    out = out.transpose(1, 2)
    if nq < N:  # pad queries
        out = torch.cat([out, out.new_zeros(B, N - nq, h, D)], 1)
        lse = torch.cat([lse, lse.new_zeros(B, h, N - nq)], 2)
    return out, lse


def shard_step(state: list, q) -> int:
    """The ring step the next call with this q will be (0 for a new loop)."""
    return state[1] + 1 if state and state[0]() is q else 0
