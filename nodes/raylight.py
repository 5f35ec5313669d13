"""Sparge Attention on every rank of a Raylight (multi-GPU, xDiT USP) sampler.

Under USP, Raylight rebinds Wan's self-attention to xfuser's xFuserLongContextAttention: a Ulysses
all-to-all (sequence split -> head split), then a ring loop that asks
`select_flash_attn_impl(attn_type, stage="fwd-only", ...)` for the per-rank function
`fn(q, k, v, dropout_p=, softmax_scale=, causal=, ...) -> (out, lse)` (q, k, v: (B, N, H/P, D), the
whole sequence, padded to a multiple of the world size, for this rank's heads) and merges the
steps by their log-sum-exp. ComfyUI's optimized_attention_override is never consulted there.

The hook: `install_hooks` replaces `select_flash_attn_impl` in xfuser's (and yunchang's) ring
module by a function that, inside a forward of a model patched here, hands back `rank_attention`,
which sends the per-rank call through the model's own attention override (the Sparge override:
settings, schedule, observers, fallbacks, stats on the forward's ForwardContext) in ComfyUI's
(B, H, N, D) layout. Outside such a forward it returns what xfuser would have used. Sequence padding
(zeros appended by Raylight) is cut off before the override sees the call: pad keys are never
attended, pad queries never counted, and the Hilbert grid matches; pad rows come back as zeros
(Raylight drops them after its all-gather). With ring degree 1 the loop has one step and xfuser
drops its lse (as for yunchang's own math backend, a zero lse is returned). Ring degree > 1: each
step is the query shard against one key shard and returns its lse for xfuser's merge; it runs
sparse without Hilbert order (nodes/raylight_ring.py). A ring call that cannot return an lse (an
override without that path) is kept dense by the `RankStats` observer ("ring attention").

The node "Sparge Attention (Raylight)" (nodes/raylight_node.py) takes Raylight's RAY_ACTORS, and each worker loads this pack
from its folder and patches its model (`patch_model`). At the end of a run `RankStats` sums every
rank's counts (torch.distributed all_gather_object), so each rank's readout (its log line, which
Ray forwards to ComfyUI's console) covers all ranks. Raylight, ray, xfuser and yunchang stay
optional: nothing here imports them before the node runs or the hooks are installed.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
from typing import NamedTuple, Optional

import torch

from .config import SpargeConfig
from .model_info import grid_candidates
from .observers import Observer
from .install import install
from .override import SpargeOverride
from .raylight_ring import ring_step, shard_step
from .stats import RunStats, StepStats

log = logging.getLogger("sparge_attention")

RING_MODULES = ("xfuser.core.long_ctx_attention.ring.ring_flash_attn", "yunchang.ring.ring_flash_attn")
R_RING = "ring attention"
WRAPPER_KEY = "sparge_attention_raylight"
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = __name__.rsplit(".nodes.", 1)[0]


class Active(NamedTuple):
    """The forward in progress on this worker: its transformer_options (the override and its
    ForwardContext are in there), the real token counts of its latent and the parallel degrees."""

    to: dict
    tokens: tuple  # t*h*w of each candidate grid (ceil / floor patching)
    ulysses: int
    ring: int
    ring_rank: int = 0
    state: Optional[list] = None  # the ring loop in progress (raylight_ring.ring_step); one list per forward


_FORWARD: contextvars.ContextVar = contextvars.ContextVar("sparge_raylight_forward", default=None)
_ORIGINAL: dict = {}  # module name -> its select_flash_attn_impl, while the hooks are installed


# ---------------------------------------------------------------------------- the per-rank call
def rank_attention(active: Active, fn, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """xfuser's per-rank call, (B, N, h, D) -> (out (B, N, h, D), lse (B, h, N) float32), through
    the attention override in transformer_options; `fn` is the function xfuser selected."""
    override = active.to.get("optimized_attention_override")
    D = q.shape[-1]
    scale_ok = softmax_scale is None or abs(softmax_scale * D ** 0.5 - 1.0) < 1e-6
    if override is None or causal or dropout_p or not scale_ok or q.dim() != 4:
        return fn(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs)
    B, N, h, _ = q.shape
    lse_of_dense = []

    def dense(q_, k_, v_, *a, **kw):  # (B, h, n, D) -> (B, h, n, D), by the function xfuser chose
        out, lse = fn(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), dropout_p=dropout_p,
                      softmax_scale=softmax_scale, causal=causal, **kwargs)
        lse_of_dense.append(lse)
        return out.transpose(1, 2)

    if active.ring > 1 and k.shape[1] == N and active.state is not None and isinstance(override, SpargeOverride):
        R, r = active.ring, active.ring_rank  # one ring step: this rank's queries, one key shard
        real = real_tokens(N * R, active.tokens, active.ulysses * R)
        last = real - N * (R - 1)  # real rows of the last shard (ring rank R-1's)
        nk = last if (r - shard_step(active.state, q)) % R == R - 1 else N
        if last > 0:
            return ring_step(override, active.to, active.state, q, k, v, last if r == R - 1 else N, nk, dense,
                             lse_of_dense, (RankStats,))
    n = N
    if active.ring == 1 and k.shape[1] == N:  # self-attention: cut the sequence padding off
        n = real_tokens(N, active.tokens, active.ulysses)
    qh, kh, vh = (t[:, :n].transpose(1, 2) for t in (q, k, v))
    out = override(dense, qh, kh, vh, heads=h, skip_reshape=True, skip_output_reshape=True,
                   transformer_options=active.to).transpose(1, 2)
    if n < N:
        out = torch.cat([out, out.new_zeros(B, N - n, h, D)], 1)
    if active.ring > 1:  # RankStats kept the call dense: the ring merge needs its lse
        if not lse_of_dense:  # an override without RankStats ran it sparse: no lse, so redo it dense
            return fn(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs)
        return out, lse_of_dense[-1]
    # ring degree 1: one ring step, whose lse xfuser drops (yunchang's math backend returns zeros too)
    return out, torch.zeros(B, h, N, dtype=torch.float32, device=q.device)


def real_tokens(n: int, tokens: tuple, ulysses: int) -> int:
    """The unpadded length of a sequence padded to a multiple of `ulysses` (n itself if unknown)."""
    for t in tokens:
        if t <= n and n - t < max(ulysses, 1) and n % max(ulysses, 1) == 0:
            return t
    return n


def _select(original):
    def select_flash_attn_impl(impl_type, stage="fwd-bwd", attn_processor=None):
        fn = original(impl_type, stage=stage, attn_processor=attn_processor)
        active = _FORWARD.get()
        if active is None or stage != "fwd-only":
            return fn
        return lambda *a, **kw: rank_attention(active, fn, *a, **kw)

    select_flash_attn_impl.sparge_original = original
    return select_flash_attn_impl


def install_hooks() -> list:
    """Route xfuser's / yunchang's per-rank attention through `rank_attention` during forwards of a
    model patched here (elsewhere it is unchanged). Returns the modules patched; [] without them."""
    import importlib

    for name in RING_MODULES:
        if name in _ORIGINAL:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # not installed, or xfuser without its pipelines' dependencies
            continue
        fn = getattr(mod, "select_flash_attn_impl", None)
        if callable(fn):  # xfuser sets it to None on machines without CUDA
            _ORIGINAL[name] = fn
            mod.select_flash_attn_impl = _select(fn)
    return sorted(_ORIGINAL)


def remove_hooks() -> None:
    import sys

    for name, fn in list(_ORIGINAL.items()):
        mod = sys.modules.get(name)
        if mod is not None and getattr(getattr(mod, "select_flash_attn_impl", None), "sparge_original", None) is fn:
            mod.select_flash_attn_impl = fn
        del _ORIGINAL[name]


def _degrees() -> tuple:
    """(ulysses, ring, ring rank) of this worker (xfuser's parallel state), (1, 1, 0) without it."""
    try:
        from xfuser.core.distributed import (get_ring_parallel_rank, get_ring_parallel_world_size,
                                             get_ulysses_parallel_world_size)

        return int(get_ulysses_parallel_world_size()), int(get_ring_parallel_world_size()), int(get_ring_parallel_rank())
    except Exception:
        return 1, 1, 0


def forward_wrapper(executor, *args, **kwargs):
    """WrappersMP.APPLY_MODEL (x, t, c_concat, c_crossattn, control, transformer_options): makes the
    forward's transformer_options visible to `rank_attention` (Raylight's Wan forward drops them)."""
    to = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    if not isinstance(to, dict):
        return executor(*args, **kwargs)
    dm = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
    tokens = tuple(g[0] * g[1] * g[2] for g in grid_candidates(dm, args[0] if args else None))
    token = _FORWARD.set(Active(to, tokens, *_degrees(), []))
    try:
        return executor(*args, **kwargs)
    finally:
        _FORWARD.reset(token)


# ---------------------------------------------------------------------------- every rank's stats
class RankStats(Observer):
    """A ring call that reaches the override stays dense (it returns no lse; ring_step runs the ring
    steps); at the end of a run every rank's counts are summed."""

    def before_sparse(self, call) -> Optional[str]:
        active = _FORWARD.get()
        return R_RING if active is not None and active.ring > 1 else None

    def run_finished(self, run, completed: bool) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        try:  # every rank ends its run here: the ranks sample together
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, summary(run))
        except Exception as e:  # a rank that failed: its readout shows this rank alone
            log.warning("Sparge Attention: could not sum the ranks' counts (%s); the readout is this rank's", e)
            return
        for rank, other in enumerate(every):
            if rank != dist.get_rank() and other is not None:
                add_summary(run, other)


def summary(run: RunStats) -> dict:
    """A run's attention counts as plain CPU values (what another rank adds to its own)."""
    steps = {}
    for key, st in run.steps.items():
        parts = [(blocks, kept.cpu(), totals) for blocks, kept, totals in st.layer_parts]
        steps[key] = dict(sigma=st.sigma, sparse_calls=st.sparse_calls, kept=int(st.kept), total=st.total,
                          pv_skipped=int(st.pv_skipped), dense=dict(st.dense), flops_total=st.flops_total,
                          flops_dense=st.flops_dense, flops_sparse_computed=float(st.flops_sparse_computed),
                          layer_parts=parts)
    errors = {b: [s.cpu(), n] for b, (s, n) in run.error_sums.items()}
    return dict(steps=steps, hilbert_used=run.hilbert_used, hilbert_not=dict(run.hilbert_not), error_sums=errors)


def add_summary(run: RunStats, other: dict) -> None:
    """Add another rank's `summary` to this rank's run (same steps: the ranks sample together)."""
    for key, s in other["steps"].items():
        st = run.steps.get(key)
        if st is None:
            st = run.steps[key] = StepStats(key, s["sigma"])
        dev = st.kept.device if isinstance(st.kept, torch.Tensor) else torch.device("cpu")
        st.sparse_calls += s["sparse_calls"]
        st.kept = st.kept + s["kept"]
        st.total += s["total"]
        st.pv_skipped = st.pv_skipped + s["pv_skipped"]
        for r, n in s["dense"].items():
            st.dense[r] = st.dense.get(r, 0) + n
        st.flops_total += s["flops_total"]
        st.flops_dense += s["flops_dense"]
        st.flops_sparse_computed = st.flops_sparse_computed + s["flops_sparse_computed"]
        st.layer_parts.extend((b, kept.to(dev), t) for b, kept, t in s["layer_parts"])
    run.hilbert_used += other["hilbert_used"]
    for r, n in other["hilbert_not"].items():
        run.hilbert_not[r] = run.hilbert_not.get(r, 0) + n
    for b, (sums, n) in other["error_sums"].items():
        mine = run.error_sums.get(b)
        if mine is None:
            run.error_sums[b] = [sums, n]
        else:
            mine[0], mine[1] = mine[0] + sums.to(mine[0].device), mine[1] + n


# ---------------------------------------------------------------------------- on the Ray workers
def patch_model(model, widgets: dict, node_id=None, map_layer: int = -1):
    """A clone of a worker's ModelPatcher with the Sparge override (a previous one of this node
    replaced), the forward wrapper and the per-rank hooks."""
    from comfy.patcher_extension import WrappersMP

    from .override import WRAPPER_KEY as OV_KEY

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    if isinstance(to.get("optimized_attention_override"), SpargeOverride):  # the node ran before on this model
        to["optimized_attention_override"] = to["optimized_attention_override"].prev
        if to["optimized_attention_override"] is None:
            del to["optimized_attention_override"]
        for kind in (WrappersMP.APPLY_MODEL, WrappersMP.OUTER_SAMPLE):
            m.remove_wrappers_with_key(kind, OV_KEY)
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    widgets = dict(widgets)
    error_check = widgets.pop("error_check", "off")
    config = dataclasses.replace(SpargeConfig.from_widgets(**widgets), error_check=error_check)
    install(m, config, node_id=node_id, map_layer=map_layer, observers=(RankStats(),))
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, forward_wrapper)
    patched = install_hooks()
    if not patched:
        log.warning("Sparge Attention: neither xfuser nor yunchang found on this worker; attention stays Raylight's")
    if not log.handlers and not logging.getLogger().handlers:  # a bare Ray worker: show the readout line
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    return m


def worker_patch(pack_dir: str, pack_name: str, widgets: dict, node_id, map_layer: int):
    """The function each Ray worker runs on its model (RayWorker.model_function_runner). Defined
    inside, so Ray pickles it by value: the worker then loads this pack from its folder."""
    def patch(model):
        import importlib
        import importlib.util
        import sys

        if pack_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(pack_name, os.path.join(pack_dir, "__init__.py"),
                                                          submodule_search_locations=[pack_dir])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[pack_name] = mod
            spec.loader.exec_module(mod)
        return importlib.import_module(pack_name + ".nodes.raylight").patch_model(model, widgets, node_id, map_layer)

    return patch


WIDGETS = ("preset", "mode", "simthreshd1", "cdfthreshd", "topk", "pvthreshd", "start_percent", "end_percent",
           "dense_blocks", "hilbert", "min_tokens", "verbose", "minshare", "fill_skipped", "target_rel_l1")
