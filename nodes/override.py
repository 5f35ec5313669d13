"""The attention override that the Sparge Attention node installs on a model clone.

ComfyUI 0.3.75 routes every attention call of a model through
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when that key is
set (comfy/ldm/modules/attention.py, wrap_attn). `SpargeOverride` is that callable:

    read the call -> a dense reason (eligibility.py) or observers' reason -> dense through `func`
                  -> else the sparse call (sparse_call.py), recorded on the forward's context

It also provides two model wrappers (comfy.patcher_extension):

* APPLY_MODEL (one model forward): learns the latent's token grid, the sampling step and the
  block count, and puts a fresh ForwardContext (stats.py) into transformer_options for that
  forward; afterwards its records are folded into the run's per-step stats.
* OUTER_SAMPLE (one sampling run): starts a fresh RunStats and CallGraphs (the run's CUDA graphs,
  sparge_core/call_graphs.py), and when the run ends builds the readout (readout.py), publishes it
  (routes.py) and keeps the sparsity map (capture.py).

Features plug in as observers (observers.py): the error check and a loaded profile's notes come
from the config, the Sparge Calibrate node passes its own to `install`. All state lives on the
SpargeOverride object stored on the clone (deep copies of the model options share it), so two
Sparge nodes on two models never see each other.
"""
from __future__ import annotations

import logging
import uuid
from typing import NamedTuple, Optional

import torch

from ..sparge_core.api import block_sizes, resolve_backend
from ..sparge_core.blockmask import block_pairs
from ..sparge_core.call_graphs import CallGraphs
from ..sparge_core.layout import merge_heads, split_heads
from . import eligibility as E
from . import sparse_call
from .capture import MAP_AUTO, capture_layer, finish_map
from .adapt import Adaptation
from .config import SpargeConfig
from .error_check import ErrorCheck
from .model_info import context_tokens, count_layers, double_blocks, grid_candidates, step_of
from .observers import LazyQKV, ObservedCall, Observer
from .profile_use import ProfileUse
from .readout import build_readout
from .routes import publish
from .stats import CallRecord, ForwardContext, RunStats, fold_forward, start_timing

log = logging.getLogger("sparge_attention")

WRAPPER_KEY = "sparge_attention"
AUTO = object()  # CallOptions.layer: counted by the override (eligibility.layer_index)


class CallOptions(NamedTuple):
    """How `SpargeOverride.attend` treats one call beyond what ComfyUI passes (the plain override
    uses PLAIN). Ring attention (nodes/raylight_ring.py) asks for the lse of a key shard, names the
    layer itself (every step of one ring loop is one transformer block) and takes no Hilbert order."""

    layer: object = AUTO  # the transformer block index (or None), or AUTO
    with_lse: bool = False  # also return the rows' log-sum-exp ("sparge::attention_lse")
    no_hilbert: Optional[str] = None  # no Hilbert order, counted under this reason
    skip: tuple = ()  # observer classes not asked before_sparse
    key_shard: bool = False  # the keys are a shard of the queries' sequence (not cross attention)


PLAIN = CallOptions()


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _signature(call, grid, keep_keys, opts: CallOptions) -> tuple:
    """What a sparse call that failed is known by for the rest of the run."""
    return (tuple(call.q.shape), tuple(call.k.shape), call.heads_split, call.q.dtype, str(call.q.device), grid,
            keep_keys is not None, opts.with_lse)


def config_observers(config: SpargeConfig) -> tuple:
    """The observers a node's settings ask for: the error target's adaptation, the error check and a
    loaded profile's readout."""
    obs = []
    if config.target_rel_l1:
        obs.append(Adaptation(config.target_rel_l1, profile=config.profile))
    if config.error_check != "off":
        obs.append(ErrorCheck(config.error_check))
    if config.profile is not None:
        obs.append(ProfileUse(config.profile, config.profile_notes))
    return tuple(obs)


class SpargeOverride:
    """optimized_attention_override for one Sparge Attention node (see the module docstring)."""

    def __init__(self, config: SpargeConfig, prev=None, node_id: Optional[str] = None,
                 map_layer: Optional[int] = MAP_AUTO, observers: tuple = ()):
        self.config = config
        self.map_layer = map_layer  # block captured for the sparsity map (-1: middle, None: off)
        self.last_map: Optional[dict] = None  # what the last finished run captured (CPU; capture.finish_map)
        self.prev = prev  # an override set before ours: dense calls go through it
        self.node_id = None if node_id is None else str(node_id)
        self.observers: tuple[Observer, ...] = config_observers(config) + tuple(observers)
        self.key = f"sparge_ctx:{uuid.uuid4().hex[:12]}"
        self.run: Optional[RunStats] = None
        self.graphs: Optional[CallGraphs] = None  # the sampling run's CUDA graphs (freed when it ends)
        self.last_graphs: Optional[dict] = None  # their summary() after the run
        self._warned: set = set()
        self._failed: set = set()  # call signatures whose sparse call raised in this run

    # ComfyUI deep-copies model_options on every ModelPatcher.clone(); the copies must keep
    # talking to this object (its wrappers are bound to it).
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __repr__(self):
        return f"SpargeOverride(node={self.node_id}, preset={self.config.preset})"

    def tag(self) -> str:
        return f" [node {self.node_id}]" if self.node_id is not None else ""

    # ------------------------------------------------------------------ the override
    def __call__(self, func, *args, **kwargs):
        return self.attend(func, args, kwargs)[0]

    def attend(self, func, args, kwargs, opts: CallOptions = PLAIN):
        """One attention call as ComfyUI hands it to the override: (out, lse). lse, (B, H, N) float32,
        only with opts.with_lse and when the call ran sparse; None when it ran dense through `func`
        (a caller that needs it takes it from its own dense function, as ring attention does)."""
        to = kwargs.get("transformer_options")
        ctx = to.get(self.key) if isinstance(to, dict) else None
        if ctx is not None:
            ctx.cur_layer = None
        call, reason = E.read_call(args, kwargs)
        if reason == E.R_CROSS and opts.key_shard:
            reason = None
        if reason is not None:
            return self._dense(func, args, kwargs, ctx, reason, call.flops if call is not None else 0.0), None
        layer = E.layer_index(ctx, to) if opts.layer is AUTO else opts.layer
        if ctx is not None:
            ctx.cur_layer = layer
        cfg = self.config
        block_q, block_k = block_sizes(call.q.device)
        reason = E.dense_reason(call, cfg, ctx is None or ctx.sparse_on, layer, block_q)
        keep_keys = None
        if reason is None and kwargs.get("mask") is not None:
            keep_keys = E.key_padding(kwargs["mask"], call.B, call.N, ctx.mask_cache if ctx is not None else {})
            if keep_keys is None:
                reason = E.R_MASK
        if reason is None and layer is not None and cfg.layer_all_dense(layer):
            reason = E.R_PROFILE_DENSE
        if reason is not None:
            return self._dense(func, args, kwargs, ctx, reason, call.flops), None

        if opts.no_hilbert is not None:
            grid, tail, why_not = None, None, opts.no_hilbert
        else:
            grid, tail, why_not = E.grid_for(cfg.hilbert, ctx, call.N, to)
        if grid is not None and keep_keys is not None and not E.grid_keys_kept(keep_keys, grid):
            grid, why_not = None, E.H_MASK
        compiling = _is_compiling()
        # the split views are made when something asks for them (not on a call that replays its graph)
        qkv = call.split() if compiling else LazyQKV(call.split)
        observed = ObservedCall(func, args, kwargs, self.run, ctx, layer, call.H, call.N, qkv, grid, keep_keys,
                                (call.q, call.k, call.v, None if call.heads_split else call.H),
                                None if compiling else self.graphs)
        for obs in self.observers:
            reason = None if isinstance(obs, opts.skip) else obs.before_sparse(observed)
            if reason is not None:  # a profile's all-dense block, the Sparge Calibrate node, ...
                return self._dense(func, args, kwargs, ctx, reason, call.flops), None

        reason = E.backend_reason(call.q.device.type)  # no usable Triton on this GPU (logged once per process)
        if reason is not None:
            return self._dense(func, args, kwargs, ctx, reason, call.flops), None
        if self._failed and _signature(call, grid, keep_keys, opts) in self._failed:
            # failed before in this run: do not retry (a compile error would repeat)
            return self._dense(func, args, kwargs, ctx, E.R_KERNEL, call.flops), None
        params = cfg.params_for_layer(layer)  # a loaded profile's per-head params, else the preset's
        for obs in self.observers:
            params = obs.choose_params(observed, params)
        capture = (ctx is not None and layer is not None and layer == ctx.capture_layer and ctx.map_mask is None
                   and not opts.with_lse)  # one op returns the mask or the lse
        timing = asker = graph_sums = None
        if compiling:
            res = sparse_call.run_sparse(*qkv, params, grid, keep_keys, capture, opts.with_lse)
        else:
            timing = start_timing(call.q) if cfg.verbose else None
            try:
                res = None
                if self.graphs is not None and keep_keys is None and not opts.with_lse:
                    # the steady state: nothing else runs (the sparsity map's block too, its mask from the graph;
                    # an observer's measurement of the call in the same graph, except on the map's block: that
                    # graph would be first seen late in a run, its measured steps every 4th after its map graph's
                    # capture, and captured there at a few ms, for 1/120 of the calls)
                    measure = None
                    for obs in () if capture else self.observers:
                        measure = obs.measure_in_graph(observed)
                        if measure is not None:
                            asker = obs
                            break
                    res = sparse_call.replay(call, params, grid, self.graphs, capture, measure)
                    if res is not None and measure is not None:
                        res, graph_sums = res[:-1], res[-1]
                if res is None:
                    res = sparse_call.run_sparse(*qkv.get(), params, grid, keep_keys, capture, opts.with_lse,
                                                 self.graphs)
            except Exception as e:  # Triton compile error, OOM in prediction, ...: finish the render dense
                self._failed.add(_signature(call, grid, keep_keys, opts))
                self._warn_kernel(e)
                return self._dense(func, args, kwargs, ctx, E.R_KERNEL, call.flops), None
            if timing is not None:
                timing[1].record()
        out = res[0]
        if ctx is not None:
            # fill_skipped adds a pass over the key blocks' means: one "key" per key block, i.e.
            # 1/block_k of a dense call's work
            fill = call.flops / block_k if params.fill_skipped else 0.0
            total = block_pairs(call.B, call.H, call.N, call.Nk, block_q, block_k)
            ctx.record_sparse(CallRecord(res[1], total, call.flops, fill, layer),
                              resolve_backend(call.q.device, "auto"), grid, tail, why_not, timing)
            if capture:
                ctx.map_mask = res[2]
        if out.dim() == 4 and call.merge_out:
            out = merge_heads(out)
        elif out.dim() == 3 and not call.merge_out:  # a replay of (B, N, H*D) inputs whose caller wants heads split
            out = split_heads(out, call.H)
        if graph_sums is not None:  # measured inside the call's graph: the asker's sums, before after_sparse
            asker.measured(observed, graph_sums)
        if ctx is not None:
            for obs in self.observers:
                obs.after_sparse(observed, out)
        return out, (res[2] if opts.with_lse else None)

    def _dense(self, func, args, kwargs, ctx: Optional[ForwardContext], reason: str, flops: float):
        if ctx is not None:
            ctx.dense[reason] = ctx.dense.get(reason, 0) + 1
            ctx.dense_flops += flops
            if ctx.capture_layer is not None and ctx.cur_layer == ctx.capture_layer:
                ctx.map_dense[reason] = ctx.map_dense.get(reason, 0) + 1
            if self.config.verbose and reason not in {r for r, _ in ctx.first_seen} and not _is_compiling():
                ctx.first_seen.append((reason, E.describe_call(args, kwargs)))
        if self.prev is not None:
            return self.prev(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _warn_kernel(self, e: Exception) -> None:
        key = ("kernel", type(e).__name__)
        if key in self._warned:
            return
        self._warned.add(key)
        first = str(e).splitlines()[0][:300] if str(e) else ""
        log.warning("Sparge Attention%s: the sparse kernel failed (%s: %s); this call and any later failing ones "
                    "run dense (counted as 'kernel error' in the readout).", self.tag(), type(e).__name__, first)

    # ------------------------------------------------------------------ model wrappers
    def apply_model_wrapper(self, executor, *args, **kwargs):
        """WrappersMP.APPLY_MODEL: BaseModel.apply_model(x, t, c_concat, c_crossattn, control,
        transformer_options, **kwargs) -- one model forward."""
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options")
        if not isinstance(to, dict):
            return executor(*args, **kwargs)
        try:
            ctx = self.forward_context(executor.class_obj, args[0] if args else None,
                                        args[3] if len(args) > 3 else None, to)
        except Exception as e:  # never break a render over bookkeeping
            log.warning("Sparge Attention%s: could not read the forward's context (%s); no Hilbert order, "
                        "no step stats for it", self.tag(), e)
            ctx = ForwardContext(None, None, None, True, (), None, 0, capture_layer(self.map_layer, None))
        to[self.key] = ctx
        for obs in self.observers:
            obs.forward_started(ctx)
        try:
            return executor(*args, **kwargs)
        finally:
            to.pop(self.key, None)
            for obs in self.observers:
                try:
                    obs.forward_finished(ctx)
                except Exception as e:  # pragma: no cover - defensive: bookkeeping never breaks a render
                    log.warning("Sparge Attention%s: %s after a forward failed: %s", self.tag(), type(obs).__name__, e)
            if self.run is None:  # a forward outside a sampling run (no OUTER_SAMPLE): keep a private run
                self.run = RunStats()
            try:
                fold_forward(self.run, ctx)
            except Exception as e:  # pragma: no cover - defensive
                log.warning("Sparge Attention%s: stats bookkeeping failed: %s", self.tag(), e)

    def forward_context(self, base_model, x, context, to) -> ForwardContext:
        """The ForwardContext of one forward of base_model (a BaseModel) on x with this context."""
        dm = getattr(base_model, "diffusion_model", None)
        step, sigma, percent = step_of(to)
        n_layers = count_layers(dm)
        if self.run is not None and n_layers is not None:
            self.run.n_layers = n_layers
        return ForwardContext(step, sigma, percent, self.config.in_schedule(percent), grid_candidates(dm, x),
                              context_tokens(context), double_blocks(dm), capture_layer(self.map_layer, n_layers))

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        """WrappersMP.OUTER_SAMPLE: CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, ...)
        -- one sampling run (each KSampler / KSamplerAdvanced)."""
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        outer_run, outer_graphs = self.run, self.graphs
        run = self.run = RunStats.start(sigmas if isinstance(sigmas, torch.Tensor) else None)
        graphs = self.graphs = CallGraphs()
        self._failed.clear()  # a new run tries the sparse kernel again
        patcher = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
        for obs in self.observers:
            obs.run_started(run, patcher)
        completed, failures = False, []
        try:
            out = executor(*args, **kwargs)
            completed = True
        finally:
            self.run, self.graphs = outer_run, outer_graphs
            self.last_graphs = graphs.summary()
            try:
                graphs.release()  # their memory, for what runs after the render (the VAE decode)
            except Exception as e:  # pragma: no cover - defensive: e.g. a sticky CUDA error of the run
                log.warning("Sparge Attention%s: releasing the run's CUDA graphs failed: %s", self.tag(), e)
            for obs in self.observers:
                try:
                    obs.run_finished(run, completed)
                except Exception as e:  # raised after the readout is out (e.g. calibration could not write)
                    failures.append(e)
            self._finish_run(run, completed)
        if failures:
            raise failures[0]
        return out

    def _finish_run(self, run: RunStats, completed: bool) -> None:
        readout = None
        try:
            readout = build_readout(self, run, completed=completed)
            publish(readout)
        except Exception as e:  # the render must finish even if the readout fails
            log.warning("Sparge Attention%s: readout failed: %s", self.tag(), e, exc_info=True)
        try:
            self.last_map = self.map_of(run, readout)
        except Exception as e:  # pragma: no cover - defensive
            log.warning("Sparge Attention%s: sparsity map capture failed: %s", self.tag(), e)

    def map_of(self, run: RunStats, readout: Optional[dict]) -> dict:
        """The sparsity map of a finished run (capture.finish_map with this node's settings)."""
        bq, bk = block_sizes(torch.device("cpu"))  # every device uses the same blocks (kernels/config.py)
        return finish_map(run, readout, self.node_id, self.config.preset, self.map_layer, bq, bk)
