"""The attention override that the Sparge Attention node installs on a model clone.

ComfyUI 0.3.75 routes every attention call of a model through
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when that key is
set (comfy/ldm/modules/attention.py, wrap_attn). `SpargeOverride` is that callable. It also
provides two model wrappers (comfy.patcher_extension):

* APPLY_MODEL (one model forward, outside any torch.compile'd diffusion model): learns the
  latent's (t, h, w) token grid from x (B, C, T, H, W) and the diffusion model's patch_size,
  the sampling step from transformer_options sigmas vs sample_sigmas, and puts a fresh
  `ForwardContext` into transformer_options for that forward. The override counts self-attention
  calls on it to know the layer index (Wan 0.3.75 passes no block index) and records its
  per-call counts there; after the forward they are folded into the run's per-step stats.
* OUTER_SAMPLE (one sampling run): starts a fresh `RunStats` and, when the run ends, builds
  the readout (nodes/readout.py), logs it and sends it to the browser.

Sparsity map capture (for the "Sparge Sparsity Map" node, nodes/sparsity_map.py): in every
forward, the sparse call of ONE transformer block (`map_layer`; -1 = the middle block) runs the
"sparge::attention_map" op, which also returns the predicted block mask; the mask of the first
batch item is bit-packed on the device and kept per step (the first forward of a step wins), up
to MAP_MAX_BYTES per run. Every sparse call also records its block index, so the run knows the
kept blocks per block and step. Nothing of this reads a device value during sampling: the
masks and counts are copied to the CPU once, at the end of the run, into `SpargeOverride.last_map`.

All state lives on the SpargeOverride object stored on the clone (deep copies of the model
options share it: `__deepcopy__` returns self), so two Sparge nodes on two models never see
each other. Nothing here touches module-level state except the readout registry.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Optional

import torch

from ..sparge_core.api import MAX_HEAD_DIM, SUPPORTED_DTYPES, block_sizes, _resolve_backend
from ..sparge_core.layout import merge_heads, split_heads
from ..sparge_core.torch_op import dense_block_total, sparge_attention_map_op, sparge_attention_op
from .config import SpargeConfig, op_thresholds

log = logging.getLogger("sparge_attention")

WRAPPER_KEY = "sparge_attention"

# dense-fallback reasons (readout keys)
R_CROSS = "cross attention"
R_SHORT = "short"
R_SCHEDULE = "schedule"
R_DENSE_BLOCK = "dense block"
R_MASK = "mask"
R_DTYPE = "dtype"
R_HEAD_DIM = "head dim"
R_SHAPE = "unsupported call"
R_KERNEL = "kernel error"
R_PROFILE_DENSE = "profile dense layer"  # a loaded profile keeps every head of this block dense
R_CALIBRATION = "calibration"  # the Sparge Calibrate node observes, then runs the call dense
REASONS = (R_CROSS, R_SHORT, R_SCHEDULE, R_DENSE_BLOCK, R_MASK, R_DTYPE, R_HEAD_DIM, R_SHAPE, R_KERNEL)

# why Hilbert order was not used on a sparse call
H_OFF = "off"
H_NO_GRID = "no grid"
H_MISMATCH = "grid mismatch"
H_MASK = "mask on grid tokens"

# Tests set this transformer_options key (on their own model clone) to make the sparse call
# raise, which exercises the "kernel error" fallback on machines where the kernel works.
TEST_FAIL_KEY = "sparge_test_fail_kernel"

MAP_AUTO = -1  # map_layer value: the middle transformer block
MAP_MAX_BYTES = 64 << 20  # packed masks kept per run (device memory while sampling); later steps are dropped


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


class ForwardContext:
    """What the override needs to know about, and records during, one model forward."""

    def __init__(self, step: Optional[int], sigma: Optional[float], percent: Optional[float], sparse_on: bool,
                 grids: tuple, context_tokens: Optional[int], n_double: int, capture_layer: Optional[int] = None):
        self.step = step
        self.sigma = sigma
        self.percent = percent
        self.sparse_on = sparse_on
        self.grids = grids  # candidate (t, h, w) token grids of the latent (ceil and floor patching)
        self.context_tokens = context_tokens  # text tokens (joint attention puts them after the grid)
        self.n_double = n_double  # HunyuanVideo-style double blocks: single block i is layer n_double + i
        self.self_attn_calls = 0
        self.max_layer = -1
        self.records = []  # (kept, pv_skipped, total_blocks, flops) per sparse call
        self.dense = {}  # reason -> calls
        self.dense_flops = 0.0
        self.hilbert_used = 0
        self.hilbert_not = {}  # reason -> sparse calls without Hilbert order
        self.last_grid = None
        self.last_tail = None
        self.backends = set()
        self.events = []  # (start, end) CUDA events of sparse calls (verbose)
        self.mask_cache = {}
        self.first_seen = []  # (reason, description) for verbose logs
        self.record_layers = []  # block index of each entry of `records`
        self.capture_layer = capture_layer  # block whose block mask is captured (None: no capture)
        self.map_mask = None  # (packed uint8 (H, NQ, ceil(NK/8)) on the device, NK) of capture_layer
        self.map_dense = {}  # reason -> calls of capture_layer that ran dense
        self.cur_layer = None  # block index of the call in progress (for map_dense)


class StepStats:
    def __init__(self, step, sigma):
        self.step = step
        self.sigma = sigma
        self.forwards = 0
        self.sparse_calls = 0
        self.kept: Any = 0  # device tensor once a sparse call ran
        self.total = 0
        self.pv_skipped: Any = 0
        self.dense = {}
        self.flops_total = 0.0  # every call, dense and sparse, at full cost
        self.flops_dense = 0.0  # calls that ran dense
        self.flops_sparse_computed: Any = 0.0  # device tensor (sum of kept * flops / total)
        self.layer_parts = []  # (block indices, kept per call (device int64 vector), total per call) per forward


class RunStats:
    def __init__(self, sigmas=None):
        self.t0 = time.monotonic()
        self.n_steps = None
        if sigmas is not None:
            try:
                self.n_steps = max(0, int(sigmas.shape[-1]) - 1)
            except Exception:
                pass
        self.steps: dict = {}
        self.forwards = 0
        self.hilbert_used = 0
        self.hilbert_not = {}
        self.grid = None
        self.tail = None
        self.backends = set()
        self.events = []
        self.max_layer = -1
        self.notes = []
        self.first_seen = {}
        self.n_layers = None  # transformer blocks of the model (from the diffusion model)
        self.map_layer = None  # the block whose masks are captured
        self.map_masks = {}  # step key -> (packed uint8 device tensor, NK, sigma)
        self.map_bytes = 0
        self.map_dropped = 0  # steps not kept (MAP_MAX_BYTES)
        self.map_dense = {}  # reason -> calls of map_layer that ran dense

    def step(self, step, sigma) -> StepStats:
        key = -1 if step is None else int(step)
        st = self.steps.get(key)
        if st is None:
            st = self.steps[key] = StepStats(key, sigma)
        return st


def _grid_candidates(diffusion_model, x) -> tuple:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return ()
    patch = getattr(diffusion_model, "patch_size", None)
    try:
        patch = tuple(int(p) for p in patch)
    except TypeError:
        return ()
    if len(patch) != 3 or min(patch) <= 0:
        return ()
    dims = x.shape[2:]
    ceil = tuple(-(-int(s) // p) for s, p in zip(dims, patch))
    floor = tuple(int(s) // p for s, p in zip(dims, patch))
    return (ceil,) if ceil == floor else (ceil, floor)


def _step_of(transformer_options: dict):
    """(step index within this sampler's run, sigma, percent of its steps) or Nones."""
    sig = transformer_options.get("sigmas")
    ss = transformer_options.get("sample_sigmas")
    if not isinstance(sig, torch.Tensor) or sig.numel() == 0:
        return None, None, None
    s = float(sig.flatten()[0])
    if not isinstance(ss, torch.Tensor) or ss.numel() < 2:
        return None, s, None
    arr = ss.detach().flatten().float().cpu().tolist()
    n = len(arr) - 1
    idx = None
    for i in range(n):
        if abs(arr[i] - s) <= 1e-5 * max(1.0, abs(s)):
            idx = i
            break
    if idx is None:  # a sub-step of a multi-stage sampler: the step that started above it
        above = [i for i in range(n) if arr[i] >= s]
        idx = above[-1] if above else 0
    return idx, s, idx / n


class SpargeOverride:
    """optimized_attention_override for one Sparge Attention node (see the module docstring)."""

    def __init__(self, config: SpargeConfig, prev=None, node_id: Optional[str] = None,
                 map_layer: Optional[int] = MAP_AUTO):
        self.config = config
        self.map_layer = map_layer  # block captured for the sparsity map (-1: middle, None: off)
        self.last_map: Optional[dict] = None  # what the last finished run captured (CPU; see finish_map)
        self.prev = prev  # an override set before ours: dense calls go through it
        self.node_id = None if node_id is None else str(node_id)
        self.key = f"sparge_ctx:{uuid.uuid4().hex[:12]}"
        self.run: Optional[RunStats] = None
        self._warned: set = set()
        self._failed: set = set()  # call signatures whose sparse call raised in this run
        self._publish = None  # set by the node: callable(readout dict) -> None

    # ComfyUI deep-copies model_options on every ModelPatcher.clone(); the copies must keep
    # talking to this object (its wrappers are bound to it).
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __repr__(self):
        return f"SpargeOverride(node={self.node_id}, preset={self.config.preset})"

    # ------------------------------------------------------------------ the override
    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options")
        ctx = to.get(self.key) if isinstance(to, dict) else None
        if ctx is not None:
            ctx.cur_layer = None
        if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
            return self._dense(func, args, kwargs, ctx, R_SHAPE, 0.0)
        q, k, v = args[0], args[1], args[2]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        skip_out = bool(kwargs.get("skip_output_reshape", False))

        if skip_reshape:
            if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
                return self._dense(func, args, kwargs, ctx, R_SHAPE, 0.0)
            B, H, N, D = q.shape
            Nk = k.shape[2]
        else:
            if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or not isinstance(heads, int) or heads <= 0 \
                    or q.shape[-1] % heads:
                return self._dense(func, args, kwargs, ctx, R_SHAPE, 0.0)
            B, N, HD = q.shape
            H, D = heads, q.shape[-1] // heads
            Nk = k.shape[1]
        flops = 4.0 * B * H * N * Nk * D

        if Nk != N:
            return self._dense(func, args, kwargs, ctx, R_CROSS, flops)
        layer = self._layer_index(ctx, to)
        if ctx is not None:
            ctx.cur_layer = layer
        capture = ctx is not None and layer is not None and layer == ctx.capture_layer and ctx.map_mask is None
        cfg = self.config
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
            return self._dense(func, args, kwargs, ctx, R_DTYPE, flops)
        if (skip_reshape and (k.shape[1] != H or v.shape != k.shape)) or (not skip_reshape and (k.shape != v.shape or k.shape[-1] != q.shape[-1])):
            return self._dense(func, args, kwargs, ctx, R_SHAPE, flops)
        if D > MAX_HEAD_DIM:
            return self._dense(func, args, kwargs, ctx, R_HEAD_DIM, flops)
        block_q, block_k = block_sizes(q.device)
        if N < max(cfg.min_tokens, block_q):
            return self._dense(func, args, kwargs, ctx, R_SHORT, flops)
        if ctx is not None and not ctx.sparse_on:
            return self._dense(func, args, kwargs, ctx, R_SCHEDULE, flops)
        if layer is not None and layer in cfg.dense_blocks:
            return self._dense(func, args, kwargs, ctx, R_DENSE_BLOCK, flops)

        mask = kwargs.get("mask")
        keep_keys = None
        if mask is not None:
            keep_keys = self._key_padding(mask, B, N, ctx)
            if keep_keys is None:
                return self._dense(func, args, kwargs, ctx, R_MASK, flops)

        if skip_reshape:
            qh, kh, vh = q, k, v
        else:
            qh, kh, vh = split_heads(q, H), split_heads(k, H), split_heads(v, H)

        grid, tail, why_not = self._grid_for(ctx, N, to)
        if grid is not None and keep_keys is not None and not self._grid_keys_kept(keep_keys, grid):
            grid, why_not = None, H_MASK

        hooked = self._call_hook(func, args, kwargs, ctx, layer, qh, kh, vh, grid, keep_keys, flops)
        if hooked is not None:  # a profile's all-dense block, or the Sparge Calibrate node
            return hooked

        fail = isinstance(to, dict) and to.get(TEST_FAIL_KEY)
        sig = (tuple(qh.shape), tuple(kh.shape), qh.dtype, str(qh.device), grid, keep_keys is not None)
        if sig in self._failed:  # failed before in this run: do not retry (a compile error would repeat)
            return self._dense(func, args, kwargs, ctx, R_KERNEL, flops)
        if _is_compiling():
            res = self._run_sparse(qh, kh, vh, grid, keep_keys, fail, capture, layer)
            timing = None
        else:
            timing = self._start_timing(q) if cfg.verbose else None
            try:
                res = self._run_sparse(qh, kh, vh, grid, keep_keys, fail, capture, layer)
            except Exception as e:  # Triton compile error, OOM in prediction, ...: finish the render dense
                self._failed.add(sig)
                key = ("kernel", type(e).__name__)
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("Sparge Attention%s: the sparse kernel failed (%s: %s); this call and any "
                                "later failing ones run dense (counted as 'kernel error' in the readout).",
                                self._node_tag(), type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                return self._dense(func, args, kwargs, ctx, R_KERNEL, flops)
            if timing is not None:
                timing[1].record()
        out, kept, skipped = res[0], res[1], res[2]

        if ctx is not None:
            total = dense_block_total(qh, kh)
            # fill_skipped adds a pass over the key blocks' means: one "key" per key block, i.e.
            # 1/block_k of a dense call's work
            extra = flops / block_k if cfg.params_for_layer(layer).fill_skipped else 0.0
            ctx.records.append((kept, skipped, total, flops, extra))
            ctx.record_layers.append(layer)
            if capture:
                ctx.map_mask = (_pack_mask(res[3][0]), int(res[3].shape[-1]))
            ctx.backends.add(_resolve_backend(q.device, "auto"))
            if grid is not None:
                ctx.hilbert_used += 1
                ctx.last_grid, ctx.last_tail = grid, tail
            else:
                ctx.hilbert_not[why_not] = ctx.hilbert_not.get(why_not, 0) + 1
            if timing is not None:
                ctx.events.append(timing)
        if not skip_out:
            out = merge_heads(out)
        if self.config.error_check != "off" and ctx is not None:
            self._check_error(func, args, kwargs, ctx, layer, out)
        return out

    # ------------------------------------------------------------------ hooks
    # (profiles: nodes/profiles_nodes.py; error check: nodes/error_check.py; the Sparge Calibrate
    # node's subclass: nodes/calibrate_node.py)
    def _call_hook(self, func, args, kwargs, ctx, layer, qh, kh, vh, grid, keep_keys, flops):
        """Called for an eligible self-attention call just before its sparse call; a non-None
        result is returned as the call's output. Here: a block whose heads a loaded profile keeps
        all dense runs ComfyUI's own attention; other profile blocks are noted for the readout."""
        cfg = self.config
        if cfg.profile is not None and layer is not None:
            if cfg.layer_all_dense(layer):
                return self._dense(func, args, kwargs, ctx, R_PROFILE_DENSE, flops)
            if not _is_compiling():
                self._note_profile_use(layer, qh.shape[2], grid)
        return None

    def _note_profile_use(self, layer, n_tokens, grid):
        from .profiles_nodes import note_profile_use

        note_profile_use(self, layer, n_tokens, grid)

    @torch.compiler.disable
    def _check_error(self, func, args, kwargs, ctx, layer, out):
        from .error_check import check_call

        check_call(self, func, args, kwargs, ctx, layer, out)

    def readout_extra(self, run) -> dict:
        """Keys the end-of-run readout adds for this override (error check, profile)."""
        from .error_check import readout_extra

        return readout_extra(self, run)

    # ------------------------------------------------------------------ pieces
    def _node_tag(self) -> str:
        return f" [node {self.node_id}]" if self.node_id is not None else ""

    def _layer_index(self, ctx: Optional[ForwardContext], to) -> Optional[int]:
        """Transformer block index of a self-attention call: HunyuanVideo-style block_index
        (double blocks first, then single blocks), else the count of self-attention calls so
        far in this forward (Wan 0.3.75 passes no block index)."""
        if isinstance(to, dict) and isinstance(to.get("block_index"), int):
            idx = to["block_index"]
            if to.get("block_type") == "single":
                idx += ctx.n_double if ctx is not None else 0
        elif ctx is not None:
            idx = ctx.self_attn_calls
        else:
            return None
        if ctx is not None:
            ctx.self_attn_calls += 1
            if idx > ctx.max_layer:
                ctx.max_layer = idx
        return idx

    def _grid_for(self, ctx: Optional[ForwardContext], n: int, to):
        if not self.config.hilbert:
            return None, None, H_OFF
        if ctx is None or not ctx.grids:
            return None, None, H_NO_GRID
        joint = isinstance(to, dict) and to.get("block_type") in ("double", "single")
        for g in ctx.grids:
            n_grid = g[0] * g[1] * g[2]
            if n == n_grid:
                return g, 0, None
            if joint and ctx.context_tokens is not None and n == n_grid + ctx.context_tokens:
                return g, ctx.context_tokens, None  # image tokens first, text tokens stay in place
        return None, None, H_MISMATCH

    @staticmethod
    def _grid_keys_kept(keep_keys, grid) -> bool:
        n_grid = grid[0] * grid[1] * grid[2]
        for idx in keep_keys[1]:
            if idx.numel() < n_grid or int(idx[n_grid - 1]) != n_grid - 1:
                return False
        return True

    @torch.compiler.disable
    def _key_padding(self, mask, B: int, Nk: int, ctx: Optional[ForwardContext]):
        """A mask that only removes keys (same for every query and head), e.g. HunyuanVideo's
        text padding: attention over the remaining keys is exactly the same thing. Returns
        (groups, index lists) -- per batch item, or one list for all -- or None when the mask is
        anything else (then the call runs dense)."""
        cache = ctx.mask_cache if ctx is not None else {}
        ck = (mask.data_ptr(), tuple(mask.shape), str(mask.dtype), B, Nk)
        if ck in cache:
            return cache[ck]
        res = None
        m = mask
        if m.dim() == 2:
            m = m.unsqueeze(0)
        if m.dim() == 3:
            m = m.unsqueeze(1)
        if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1 and m.shape[3] == Nk and m.shape[0] in (1, B):
            row = m[:, 0, 0, :]
            if row.dtype == torch.bool:
                keep = row
                pure = True
            else:
                rf = row.float()
                keep = rf == 0
                pure = bool(((rf == 0) | (rf <= -1e4)).all())
            if pure and bool(keep.any(dim=-1).all()):
                lists = [keep[i].nonzero().flatten() for i in range(keep.shape[0])]
                res = ("shared" if keep.shape[0] == 1 else "per_item", lists)
        cache[ck] = res
        return res

    def _op(self, qh, kh, vh, grid, want_mask=False, layer=None):
        cfg = self.config
        H = qh.shape[1]
        p = cfg.params_for_layer(layer)  # a loaded profile's per-head params, else the preset's
        sim, thr, pv = op_thresholds(p, H)
        op = sparge_attention_map_op if want_mask else sparge_attention_op
        return op(qh, kh, vh, sim, thr, pv, p.mode, False, list(grid) if grid else [], -1.0, p.scoring,
                  bool(p.fill_skipped))

    def _run_sparse(self, qh, kh, vh, grid, keep_keys, fail, want_mask=False, layer=None):
        """(out, kept, pv_skipped), plus the (B, H, NQ, NK) block mask when want_mask (of the
        first batch item only when each item has its own key padding)."""
        if fail:
            raise RuntimeError("sparse kernel failure injected by the test key " + TEST_FAIL_KEY)
        if keep_keys is None:
            return self._op(qh, kh, vh, grid, want_mask, layer=layer)
        kind, lists = keep_keys
        if kind == "shared":
            idx = lists[0].to(kh.device)
            if idx.numel() == kh.shape[2]:
                return self._op(qh, kh, vh, grid, want_mask, layer=layer)
            return self._op(qh, kh.index_select(2, idx), vh.index_select(2, idx), grid, want_mask, layer=layer)
        outs, kept, skipped, mask = [], 0, 0, None
        for b, idx in enumerate(lists):
            idx = idx.to(kh.device)
            r = self._op(qh[b:b + 1], kh[b:b + 1].index_select(2, idx), vh[b:b + 1].index_select(2, idx), grid,
                         want_mask and b == 0, layer=layer)
            outs.append(r[0])
            kept, skipped = kept + r[1], skipped + r[2]
            if want_mask and b == 0:
                mask = r[3]
        if want_mask:
            return torch.cat(outs, 0), kept, skipped, mask
        return torch.cat(outs, 0), kept, skipped

    @staticmethod
    def _start_timing(q):
        if q.device.type != "cuda":
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return (start, end)

    def _dense(self, func, args, kwargs, ctx: Optional[ForwardContext], reason: str, flops: float):
        if ctx is not None:
            ctx.dense[reason] = ctx.dense.get(reason, 0) + 1
            ctx.dense_flops += flops
            if ctx.capture_layer is not None and ctx.cur_layer == ctx.capture_layer:
                ctx.map_dense[reason] = ctx.map_dense.get(reason, 0) + 1
            if self.config.verbose and reason not in {r for r, _ in ctx.first_seen} and not _is_compiling():
                ctx.first_seen.append((reason, _describe_call(args, kwargs)))
        if self.prev is not None:
            return self.prev(func, *args, **kwargs)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ model wrappers
    def apply_model_wrapper(self, executor, *args, **kwargs):
        """WrappersMP.APPLY_MODEL: BaseModel.apply_model(x, t, c_concat, c_crossattn, control,
        transformer_options, **kwargs) -- one model forward."""
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options")
        if not isinstance(to, dict):
            return executor(*args, **kwargs)
        try:
            ctx = self._make_ctx(executor.class_obj, args[0] if args else None, args[3] if len(args) > 3 else None, to)
        except Exception as e:  # never break a render over bookkeeping
            log.warning("Sparge Attention%s: could not read the forward's context (%s); no Hilbert order, "
                        "no step stats for it", self._node_tag(), e)
            ctx = ForwardContext(None, None, None, True, (), None, 0, self._capture_layer(None))
        to[self.key] = ctx
        try:
            return executor(*args, **kwargs)
        finally:
            to.pop(self.key, None)
            try:
                self._fold(ctx)
            except Exception as e:  # pragma: no cover - defensive
                log.warning("Sparge Attention%s: stats bookkeeping failed: %s", self._node_tag(), e)

    def _make_ctx(self, base_model, x, context, to) -> ForwardContext:
        dm = getattr(base_model, "diffusion_model", None)
        grids = _grid_candidates(dm, x)
        step, sigma, percent = _step_of(to)
        ctx_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() == 3 else None
        n_double = len(getattr(dm, "double_blocks", ()) or ())
        return ForwardContext(step, sigma, percent, self.config.in_schedule(percent), grids, ctx_tokens, n_double,
                              self._capture_layer(dm))

    def _capture_layer(self, dm) -> Optional[int]:
        """The block whose block mask this forward captures (None: capture off)."""
        n = _count_layers(dm)
        if self.run is not None and n is not None:
            self.run.n_layers = n
        if self.map_layer is None:
            return None
        if self.map_layer >= 0:
            return int(self.map_layer)
        return n // 2 if n else 0

    def _fold(self, ctx: ForwardContext):
        run = self.run
        if run is None:  # a forward outside a sampling run (no OUTER_SAMPLE): keep a private run
            run = self.run = RunStats()
        st = run.step(ctx.step, ctx.sigma)
        st.forwards += 1
        run.forwards += 1
        for reason, n in ctx.dense.items():
            st.dense[reason] = st.dense.get(reason, 0) + n
        st.flops_total += ctx.dense_flops
        st.flops_dense += ctx.dense_flops
        if ctx.records:
            # device tensors, summed on the device: no host sync until the end-of-run readout
            kept_vec = torch.stack([r[0].reshape(()) for r in ctx.records])
            st.kept = st.kept + kept_vec.sum()
            if len(ctx.record_layers) == len(ctx.records):
                st.layer_parts.append((tuple(ctx.record_layers), kept_vec, tuple(r[2] for r in ctx.records)))
            st.pv_skipped = st.pv_skipped + torch.stack([r[1].reshape(()) for r in ctx.records]).sum()
            computed = torch.stack([r[0].reshape(()).double() * (r[3] / r[2]) for r in ctx.records]).sum()
            computed = computed + sum(r[4] for r in ctx.records)
            st.flops_sparse_computed = st.flops_sparse_computed + computed
            st.total += sum(r[2] for r in ctx.records)
            st.flops_total += sum(r[3] for r in ctx.records)
            st.sparse_calls += len(ctx.records)
        run.hilbert_used += ctx.hilbert_used
        for r, n in ctx.hilbert_not.items():
            run.hilbert_not[r] = run.hilbert_not.get(r, 0) + n
        if ctx.last_grid is not None:
            run.grid, run.tail = ctx.last_grid, ctx.last_tail
        run.backends |= ctx.backends
        run.events.extend(ctx.events)
        run.max_layer = max(run.max_layer, ctx.max_layer)
        for reason, desc in ctx.first_seen:
            run.first_seen.setdefault(reason, desc)
        if ctx.capture_layer is not None:
            run.map_layer = ctx.capture_layer
            for reason, n in ctx.map_dense.items():
                run.map_dense[reason] = run.map_dense.get(reason, 0) + n
            if ctx.map_mask is not None and st.step not in run.map_masks:
                packed, nk = ctx.map_mask
                nbytes = packed.numel() * packed.element_size()
                if run.map_bytes + nbytes <= MAP_MAX_BYTES:
                    run.map_masks[st.step] = (packed, nk, ctx.sigma)
                    run.map_bytes += nbytes
                else:
                    run.map_dropped += 1

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        """WrappersMP.OUTER_SAMPLE: CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, ...)
        -- one sampling run (each KSampler / KSamplerAdvanced)."""
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        outer_run = self.run
        run = self.run = RunStats(sigmas if isinstance(sigmas, torch.Tensor) else None)
        self._failed.clear()  # a new run tries the sparse kernel again
        completed = False
        try:
            out = executor(*args, **kwargs)
            completed = True
            return out
        finally:
            self.run = outer_run
            readout = None
            try:
                from .readout import build_readout, publish

                readout = build_readout(self, run, completed=completed)
                (self._publish or publish)(readout)
            except Exception as e:  # the render must finish even if the readout fails
                log.warning("Sparge Attention%s: readout failed: %s", self._node_tag(), e, exc_info=True)
            try:
                self.last_map = finish_map(self, run, readout)
            except Exception as e:  # pragma: no cover - defensive
                log.warning("Sparge Attention%s: sparsity map capture failed: %s", self._node_tag(), e)


def _count_layers(dm) -> Optional[int]:
    """Transformer blocks of a diffusion model (HunyuanVideo-style: double + single blocks)."""
    if dm is None:
        return None
    n = 0
    for name in ("double_blocks", "single_blocks"):
        n += len(getattr(dm, name, ()) or ())
    if n:
        return n
    for name in ("blocks", "transformer_blocks", "joint_blocks", "layers"):
        try:
            n = len(getattr(dm, name))
        except (AttributeError, TypeError):
            continue
        if n:
            return n
    return None


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(H, NQ, NK) bool -> (H, NQ, ceil(NK / 8)) uint8, bit j of byte c = block 8c + j. Device ops
    only (no host-to-device copy, no sync)."""
    nk = mask.shape[-1]
    m = mask.to(torch.uint8)
    pad = (-nk) % 8
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    m = m.reshape(*m.shape[:-1], -1, 8)
    bits = torch.arange(8, device=m.device, dtype=torch.uint8)
    return torch.bitwise_left_shift(m, bits).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, nk: int) -> torch.Tensor:
    """Inverse of _pack_mask: (..., ceil(NK / 8)) uint8 -> (..., NK) bool."""
    bits = torch.arange(8, device=packed.device, dtype=torch.uint8)
    m = torch.bitwise_and(torch.bitwise_right_shift(packed[..., None], bits), 1).bool()
    return m.reshape(*packed.shape[:-1], -1)[..., :nk]


def finish_map(ov, run: "RunStats", readout: Optional[dict]) -> dict:
    """What the Sparge Sparsity Map node draws, on the CPU (called once per run, at its end)."""
    steps = sorted(run.map_masks)
    masks = {}
    if steps:
        flat = torch.cat([run.map_masks[s][0].reshape(-1) for s in steps]).cpu()
        off = 0
        for s in steps:
            packed, nk, sigma = run.map_masks[s]
            n = packed.numel()
            masks[s] = {"packed": flat[off:off + n].reshape(packed.shape), "nk": nk, "sigma": sigma}
            off += n
    r = readout or {}
    bq, bk = block_sizes(torch.device("cpu"))  # every device uses the same blocks (kernels/config.py)
    return {
        "node_id": ov.node_id,
        "block_q": bq,
        "block_k": bk,
        "prompt_id": r.get("prompt_id"),
        "preset": ov.config.preset,
        "map_layer": run.map_layer,
        "map_layer_setting": ov.map_layer,
        "n_layers": run.n_layers,
        "masks": masks,  # step -> {"packed": uint8 (H, NQ, ceil(NK/8)), "nk", "sigma"}
        "dropped_steps": run.map_dropped,
        "map_dense": dict(run.map_dense),
        "hilbert": bool(r.get("hilbert_used")),
        "grid": (r.get("hilbert") or {}).get("grid"),
        "n_steps": run.n_steps,
        "steps": [s.get("step") for s in r.get("per_step", [])],
        "per_step_sparsity": r.get("per_step_sparsity", []),
        "layer_step_sparsity": r.get("layer_step_sparsity", []),
        "layers_seen": r.get("layers_seen"),
        "sparsity": r.get("sparsity"),
    }


def _describe_call(args, kwargs) -> str:
    shapes = [tuple(a.shape) for a in args[:3] if isinstance(a, torch.Tensor)]
    extra = {k: kwargs[k] for k in ("heads", "skip_reshape", "skip_output_reshape") if k in kwargs}
    to = kwargs.get("transformer_options") or {}
    for k in ("block_type", "block_index"):
        if k in to:
            extra[k] = to[k]
    if kwargs.get("mask") is not None:
        extra["mask"] = tuple(kwargs["mask"].shape)
    return f"q/k/v {shapes} {extra}"


def install(model_patcher, config: SpargeConfig, node_id=None, map_layer: Optional[int] = MAP_AUTO) -> SpargeOverride:
    """Patch a ModelPatcher (already cloned by the caller) with a fresh SpargeOverride."""
    from comfy.patcher_extension import WrappersMP

    to = model_patcher.model_options.setdefault("transformer_options", {})
    prev = to.get("optimized_attention_override")
    ov = SpargeOverride(config, prev=prev, node_id=node_id, map_layer=map_layer)
    if prev is not None:
        log.info("Sparge Attention%s: another attention override was set before this node (%r); "
                 "calls that stay dense go through it.", ov._node_tag(), prev)
    to["optimized_attention_override"] = ov
    model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, ov.apply_model_wrapper)
    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, ov.outer_sample_wrapper)
    return ov


def find_override(model_patcher) -> Optional[SpargeOverride]:
    """The SpargeOverride installed on a ModelPatcher (also behind overrides chained after it)."""
    opts = getattr(model_patcher, "model_options", None) or {}
    ov = (opts.get("transformer_options") or {}).get("optimized_attention_override")
    seen = set()
    while ov is not None and id(ov) not in seen:
        if isinstance(ov, SpargeOverride):
            return ov
        seen.add(id(ov))
        ov = getattr(ov, "prev", None)
    try:
        from comfy.patcher_extension import WrappersMP

        for fn in (getattr(model_patcher, "wrappers", {}) or {}).get(WrappersMP.OUTER_SAMPLE, {}).get(WRAPPER_KEY, []):
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, SpargeOverride):
                return owner
    except Exception:  # pragma: no cover - not inside ComfyUI
        pass
    return None


__all__ = ["SpargeOverride", "ForwardContext", "RunStats", "install", "find_override", "finish_map", "unpack_mask",
           "REASONS", "WRAPPER_KEY", "MAP_AUTO", "MAP_MAX_BYTES"]
