"""Parameters of the SpargeAttn method, validated once at the edge.

Every threshold may be a Python number (same for all heads) or a 1-D tensor with one
value per attention head; `per_head()` turns either into an (H,) float32 tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Union

import torch

Threshold = Union[float, int, torch.Tensor]
DEFAULT_CDF = 0.98
SCORINGS = ("pooled", "lse")
MODES = ("cdf", "topk", "share")
THRESHOLD_FIELD = {"cdf": "cdfthreshd", "topk": "topk", "share": "minshare"}  # each mode's one threshold
MAX_MINSHARE = 64.0
THRESHOLDS = ("simthreshd1", "cdfthreshd", "topk", "minshare", "pvthreshd")  # numbers or per-head tensors


def _check_range(name: str, value: Threshold, lo: float, hi: float, lo_open: bool) -> None:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a number or a 1-D per-head tensor, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if torch.isnan(t).any():
        raise ValueError(f"{name} is NaN")
    bad = (t <= lo) if lo_open else (t < lo)
    bad |= t > hi
    if bad.any():
        lo_br = "(" if lo_open else "["
        raise ValueError(f"{name} must lie in {lo_br}{lo}, {hi}], got {t.tolist()}")


def _stamp(x):
    """What a cached per-head copy of threshold x depends on: nothing for a number (the dataclass
    is frozen), the values of a CPU tensor (read with no device sync), and for a tensor elsewhere
    a new object each time (never equal: it is read as it is on every call)."""
    if not isinstance(x, torch.Tensor):
        return None
    if x.device.type == "cpu":  # thresholds are 0-D or 1-D (__post_init__): tolist alone, one op per call
        vals = x.tolist()
        return tuple(vals) if isinstance(vals, list) else (vals,)
    return object()


@dataclass(frozen=True)
class SpargeParams:
    """Hyper-parameters of one sparse attention call (reference.py is the method, step by step).

    simthreshd1: a block counts as self-similar when its mean pairwise cosine exceeds this.
        Non-self-similar query blocks keep every key block; non-self-similar key blocks are kept
        for every query. -1 switches the rule off (every block counts as self-similar).
    cdfthreshd:  keep the fewest key blocks whose predicted attention mass reaches this (CDF mode).
    topk:        keep this fraction of key blocks per query block (top-k mode).
    minshare:    keep every key block whose predicted share of the query block's attention is at
                 least minshare times the uniform share 1/(number of key blocks) (share mode); the
                 most probable block is always kept. One threshold for every row: a flat row (a
                 global head) keeps all its blocks, a peaked row drops its tail, and the blocks
                 dropped are the least probable ones anywhere, which is what minimises the dropped
                 mass for a given number of kept blocks. Exactly one of cdfthreshd / topk / minshare
                 is set.
    pvthreshd:   skip a block's P.V when every row's block max is more than this many log2 units
                 below its running max. inf never skips.
    scoring:     how stage 1 scores a key block for a query block: "pooled" compares the two block
                 means (the paper); "lse" sums the pooled query's exp-scores over every key of the
                 block (the block's true attention mass for the mean query; costs ~1/64 of dense).
    fill_skipped: instead of dropping the skipped key blocks, add an estimate of their share:
                 each skipped block acts as one extra key, its mean key and mean value, with a
                 per-(query block, key block) bias that makes the estimate exact for the pooled
                 query (its lse score minus its score against the mean key). Costs one pass over
                 the block means per query block (~1/128 of dense attention's work); needs "lse"
                 scoring. Only applies to predicted masks.
    """

    simthreshd1: Threshold = 0.6
    cdfthreshd: Optional[Threshold] = None  # None and no topk: CDF mode with DEFAULT_CDF
    topk: Optional[Threshold] = None
    minshare: Optional[Threshold] = None
    pvthreshd: Threshold = 50.0
    attention_sink: bool = False
    is_causal: bool = False
    scoring: str = "pooled"  # "pooled": q_pool . k_pool (the paper); "lse": pooled query vs every key
    fill_skipped: bool = False

    def __post_init__(self) -> None:
        chosen = [f for f in THRESHOLD_FIELD.values() if getattr(self, f) is not None]
        if not chosen:
            object.__setattr__(self, "cdfthreshd", DEFAULT_CDF)
        elif len(chosen) > 1:
            raise ValueError("set exactly one of cdfthreshd (CDF mode), topk (top-k mode) or minshare (share mode), "
                             f"got {' and '.join(chosen)}")
        object.__setattr__(self, "_mode", next(m for m, f in THRESHOLD_FIELD.items() if getattr(self, f) is not None))
        _check_range("simthreshd1", self.simthreshd1, -1.0, 1.0, lo_open=False)
        if self.cdfthreshd is not None:
            _check_range("cdfthreshd", self.cdfthreshd, 0.0, 1.0, lo_open=True)
        if self.topk is not None:
            _check_range("topk", self.topk, 0.0, 1.0, lo_open=True)
        if self.minshare is not None:
            _check_range("minshare", self.minshare, 0.0, MAX_MINSHARE, lo_open=False)
        _check_range("pvthreshd", self.pvthreshd, 0.0, math.inf, lo_open=True)
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        for name in ("attention_sink", "is_causal", "fill_skipped"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool")
        if self.fill_skipped and self.scoring != "lse":
            raise ValueError("fill_skipped needs scoring='lse' (the estimate is calibrated by the lse scores)")

    @property
    def mode(self) -> str:
        # asked on every attention call, also while torch.compile traces the node's override: a plain
        # attribute set in __post_init__ (torch 2.11's dynamo cannot trace dict.setdefault on __dict__)
        return self._mode

    @property
    def threshold_field(self) -> str:
        """The name of the field that holds this mode's threshold."""
        return THRESHOLD_FIELD[self.mode]

    @property
    def threshold(self) -> Threshold:
        """cdfthreshd, topk or minshare, whichever the mode uses."""
        return getattr(self, self.threshold_field)

    @classmethod
    def for_mode(cls, mode: str, threshold: Threshold, **kw) -> "SpargeParams":
        """SpargeParams with `threshold` in the field of `mode` ("cdf", "topk" or "share")."""
        if mode not in THRESHOLD_FIELD:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return cls(**{THRESHOLD_FIELD[mode]: threshold}, **kw)

    def per_head(self, name: str, heads: int, device=None) -> torch.Tensor:
        """The threshold `name` as an (heads,) float32 tensor on `device`.

        Cached per (name, heads, device): a host-to-device copy from pageable memory
        synchronizes the stream, which would stall every attention call of a render. The first
        copy goes through pinned memory, asynchronously. A tensor threshold is also cached per its
        values: the error-target adaptation (nodes/adapt.py) moves its thresholds in place, and
        the device copy must follow them: new values are copied into the same device tensor (a
        tensor already off the CPU is used as it is)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        src = getattr(self, name)
        stamp = _stamp(src)
        key = (name, heads, dev)
        cache = self.__dict__.setdefault("_per_head_cache", {})
        hit = cache.get(key)
        if hit is None or hit[0] != stamp:
            t = torch.as_tensor(src, dtype=torch.float32).flatten()
            if t.numel() == 1:
                t = t.expand(heads)
            elif t.numel() != heads:
                raise ValueError(f"{name} has {t.numel()} per-head values but the call has {heads} heads")
            t = t.contiguous()
            if dev.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            if hit is not None and dev.type != "cpu" and t.device.type == "cpu":
                # new values into the same device tensor, ordered on the stream like any launch: its
                # address stays, so a CUDA graph that reads it (call_graphs.py) replays with them
                hit[1].copy_(t, non_blocking=True)
                hit = cache[key] = (stamp, hit[1])
            else:
                hit = cache[key] = (stamp, t.to(dev, non_blocking=True))
        return hit[1]

    def device_key(self, heads: int, device) -> tuple:
        """(key, thresholds) of a CUDA graph of a call with these params (call_graphs.py). key: every
        setting that is not a threshold, which thresholds are set, and the two switches their values
        make (the similarity rule, P.V skipping: other kernels). thresholds: (name, (heads,) float32
        device tensor) of each set threshold. A graphed call passes those tensors' addresses through
        its address table and the graph reads their values when it replays, so they are no part of
        the key: the blocks of a model, whose thresholds differ (the error target's), share a graph.
        A threshold moved in place reaches it too (per_head copies new values into the same tensor)."""
        # asked on every graphed call: the answer is kept while no threshold tensor changed its values
        # (_stamp's rule, its checks worked out once: ~8 of an H100 host's ~90 us per call went here,
        # bench/host_breakdown.py). A threshold tensor off the CPU is never read here (that would sync):
        # nothing is kept, and the answer is made again on every call
        names, settings, live, kept, made = self._once("device_key", self._device_key_plan)
        stamps = [v.tolist() for v in live] if kept else None
        hit = made.get((heads, device))
        if kept and hit is not None and hit[0] == stamps:
            return hit[1]
        res = settings, tuple((name, self.per_head(name, heads, device)) for name in names)
        made[(heads, device)] = stamps, res
        return res

    def _device_key_plan(self) -> tuple:
        """What device_key works out once: the set thresholds' names, the graph key, the threshold
        tensors whose values it compares on each call, whether they all live on the CPU, and its
        answers so far by (heads, device)."""
        names, settings = self._key_parts()
        live = tuple(v for v in (getattr(self, n) for n in names) if isinstance(v, torch.Tensor))
        return names, settings, live, all(v.device.type == "cpu" for v in live), {}

    def _key_parts(self) -> tuple:
        """(the set thresholds' names, the graph key: the other settings, those names, the switches)."""
        names = tuple(f.name for f in fields(self) if f.name in THRESHOLDS and getattr(self, f.name) is not None)
        settings = tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in THRESHOLDS)
        return names, settings + (("thresholds", names), ("sim_rule", self.sim_rule_enabled()),
                                  ("pv_skip", self.pv_skip_enabled()))

    def check_heads(self, heads: int) -> None:
        for f in THRESHOLDS:
            if getattr(self, f) is not None:
                self.per_head(f, heads)

    def _once(self, name: str, fn):
        # asked on every attention call: worked out once per object (the fields never change: frozen)
        cache = self.__dict__.get("_once_cache")
        if cache is None:
            cache = self.__dict__["_once_cache"] = {}
        if name not in cache:
            cache[name] = fn()
        return cache[name]

    def sim_rule_enabled(self) -> bool:
        """At simthreshd1 = -1 every block counts as self-similar: the rule changes nothing."""
        return self._once("sim", lambda: bool((torch.as_tensor(self.simthreshd1, dtype=torch.float64) > -1.0).any()))

    def pv_skip_enabled(self) -> bool:
        return self._once("pv", lambda: bool(torch.isfinite(torch.as_tensor(self.pvthreshd,
                                                                             dtype=torch.float64)).any()))

    def replace(self, **changes) -> "SpargeParams":
        return replace(self, **changes)

    def describe(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out
