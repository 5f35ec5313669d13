"""Calibrated per-layer, per-head settings as a shareable safetensors file.

A profile holds (layers x heads) tensors of thresholds and a dense flag, plus what was
measured when it was made (sampled sparsity and rel-L1 per layer and head) and the conditions
(model family, token count, grid, target error, steps, backend rounding, block sizes).

Files are safetensors: tensors plus string metadata. Loading never unpickles anything: the
bytes are read and checked by profile_format.py (header as JSON, tensors by safetensors' own
parser), then every field is checked here (ValueError with a message saying what is wrong).

Dense heads: `params_for_layer` gives them cdfthreshd/topk 1.0 AND simthreshd1 1.0. No block
has a mean pairwise cosine above 1, so every query block of such a head counts as "not
self-similar" and keeps every key block: the sparse call computes the head fully (its error is
quantization only). `dense_heads(layer)` reports the flag too, for a caller that prefers to run
those heads through dense attention instead.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch

from .params import SCORINGS, SpargeParams
from .profile_format import fail as _fail
from .profile_format import load_tensors as _load_tensors
from .profile_format import meta_int as _meta_int
from .profile_format import parse_header, read_bytes

# written into each profile: pyproject.toml's version (tests/test_profiles.py checks that they agree)
PACK_VERSION = "0.1.0"
FORMAT = "sparge-attention-profile"
FORMAT_VERSION = 1
DENSE_THRESHOLD = 1.0
DENSE_SIMTHRESHD1 = 1.0

# tensor name -> (dtype, shape kind) ; the threshold tensor is named after the mode
_LH, _L = "LH", "L"
_TENSORS = {
    "simthreshd1": (torch.float32, _LH),
    "pvthreshd": (torch.float32, _LH),
    "dense": (torch.bool, _LH),
    "calibrated": (torch.bool, _L),
    "head_sparsity": (torch.float32, _LH),
    "head_rel_l1": (torch.float32, _LH),
    "sparsity": (torch.float32, _L),
    "rel_l1": (torch.float32, _L),
    "rel_l1_worst": (torch.float32, _L),
}
_THRESHOLD_NAME = {"cdf": "cdfthreshd", "topk": "topk"}
_META_INT = ("heads", "layers", "n_tokens", "steps", "calls", "block_q", "block_k", "sample_query_blocks")
_META_STR = ("model_family", "mode", "scoring", "pv_dtype", "combine", "pack_version", "token_order")


@dataclass(eq=False)
class SpargeProfile:
    mode: str  # "cdf" or "topk" (one mode for the whole model)
    scoring: str  # "lse" or "pooled"
    threshold: torch.Tensor  # (L, H) float32: cdfthreshd or topk
    simthreshd1: torch.Tensor  # (L, H) float32
    pvthreshd: torch.Tensor  # (L, H) float32, inf = P.V skipping off
    dense: torch.Tensor  # (L, H) bool
    calibrated: torch.Tensor  # (L,) bool: layers never observed run dense
    head_sparsity: torch.Tensor  # (L, H) sampled block sparsity at the chosen settings
    head_rel_l1: torch.Tensor  # (L, H) sampled rel-L1 vs fp32 dense (sum over calls)
    sparsity: torch.Tensor  # (L,) mean of head_sparsity
    rel_l1: torch.Tensor  # (L,) sampled rel-L1 of the layer's output (all heads, all calls)
    rel_l1_worst: torch.Tensor  # (L,) the worst single calibration call of the layer
    model_family: str = "unknown"
    n_tokens: int = 0  # tokens per call at calibration
    grid: Optional[tuple] = None  # (t, h, w) latent grid (Hilbert order) or None (raster)
    target_l1: float = 0.05
    steps: int = 0
    calls: int = 0
    block_q: int = 64
    block_k: int = 128
    pv_dtype: str = "fp8"  # P.V rounding the error was measured with
    sample_query_blocks: int = 32
    combine: str = "max"
    pack_version: str = PACK_VERSION
    fill_skipped: bool = False  # calibrated (and run) with the skipped blocks estimated; files before it: no

    def __post_init__(self):
        if self.grid is not None:
            self.grid = tuple(int(g) for g in self.grid)
        self.validate()

    # ------------------------------------------------------------------ shape and checks
    @property
    def layers(self) -> int:
        return int(self.threshold.shape[0])

    @property
    def heads(self) -> int:
        return int(self.threshold.shape[1])

    @property
    def token_order(self) -> str:
        return "hilbert" if self.grid is not None else "raster"

    def validate(self, path=None) -> None:
        if self.mode not in _THRESHOLD_NAME:
            _fail(path, f"mode must be 'cdf' or 'topk', got {self.mode!r}")
        if self.scoring not in SCORINGS:
            _fail(path, f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.pv_dtype not in ("fp8", "fp16", "fp32"):
            _fail(path, f"pv_dtype must be fp8, fp16 or fp32, got {self.pv_dtype!r}")
        if not isinstance(self.fill_skipped, bool):
            _fail(path, f"fill_skipped must be a bool, got {self.fill_skipped!r}")
        if self.fill_skipped and self.scoring != "lse":
            _fail(path, "fill_skipped needs 'lse' scoring")
        t = self.threshold
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            _fail(path, f"threshold must be a (layers, heads) tensor, got {getattr(t, 'shape', type(t))}")
        L, H = t.shape
        tname = _THRESHOLD_NAME[self.mode]
        for name, (dtype, kind) in {tname: (torch.float32, _LH), **_TENSORS}.items():
            x = self.threshold if name == tname else getattr(self, name)
            want = (L, H) if kind == _LH else (L,)
            if not isinstance(x, torch.Tensor):
                _fail(path, f"{name} must be a tensor")
            if x.dtype != dtype:
                _fail(path, f"tensor {name!r} has dtype {x.dtype}, expected {dtype}")
            if tuple(x.shape) != want:
                _fail(path, f"tensor {name!r} has shape {tuple(x.shape)}, expected {want} "
                            f"({L} layers x {H} heads, from {tname!r})")
        for name in (tname, "simthreshd1", "pvthreshd", "head_sparsity", "head_rel_l1", "sparsity", "rel_l1",
                     "rel_l1_worst"):
            x = self.threshold if name == tname else getattr(self, name)
            if torch.isnan(x).any():
                _fail(path, f"tensor {name!r} contains NaN")
        thr = self.threshold.double()
        if ((thr <= 0) | (thr > 1)).any():
            _fail(path, f"{tname} values must lie in (0, 1], got min {thr.min().item():g}, max {thr.max().item():g}")
        sim = self.simthreshd1.double()
        if ((sim < -1) | (sim > 1)).any():
            _fail(path, "simthreshd1 values must lie in [-1, 1]")
        if (self.pvthreshd <= 0).any():
            _fail(path, "pvthreshd values must be > 0 (inf = off)")
        for name in ("head_sparsity", "sparsity"):
            x = getattr(self, name)
            if ((x < 0) | (x > 1)).any():
                _fail(path, f"{name} values must lie in [0, 1]")
        for name in ("head_rel_l1", "rel_l1", "rel_l1_worst"):
            x = getattr(self, name)
            if (~torch.isfinite(x)).any() or (x < 0).any():
                _fail(path, f"{name} values must be finite and >= 0")
        # the per-layer figures must agree with the per-head ones
        mean_sp = self.head_sparsity.double().mean(1)
        if ((mean_sp - self.sparsity.double()).abs() > 1e-4).any():
            _fail(path, "per-layer sparsity does not match the mean of head_sparsity (edited or corrupt file)")
        if (self.dense & (self.head_sparsity > 0)).any():
            _fail(path, "a head is flagged dense but has a non-zero sparsity (edited or corrupt file)")
        if (~self.calibrated[:, None] & ~self.dense).any():
            _fail(path, "a layer that was not calibrated has heads that are not dense")
        if not (0.0 < float(self.target_l1) <= 1.0) or math.isnan(float(self.target_l1)):
            _fail(path, f"target_l1 must lie in (0, 1], got {self.target_l1}")
        for name in ("n_tokens", "block_q", "block_k", "sample_query_blocks"):
            if int(getattr(self, name)) < 1:
                _fail(path, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "calls"):
            if int(getattr(self, name)) < 0:
                _fail(path, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grid is not None:
            if len(self.grid) != 3 or min(self.grid) < 1:
                _fail(path, f"grid must be three positive integers, got {self.grid}")
            if math.prod(self.grid) > self.n_tokens:
                _fail(path, f"grid {self.grid} has more tokens than n_tokens={self.n_tokens}")
        if not self.combine or not isinstance(self.combine, str):
            _fail(path, "combine must be a non-empty string")

    def __eq__(self, other) -> bool:
        if not isinstance(other, SpargeProfile):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor):
                if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None

    # ------------------------------------------------------------------ use
    def _check_layer(self, layer: int) -> int:
        layer = int(layer)
        if not (0 <= layer < self.layers):
            raise ValueError(f"layer {layer} is outside this profile's {self.layers} layers")
        return layer

    def dense_heads(self, layer: int) -> torch.Tensor:
        """(H,) bool: heads of `layer` that run dense (all of them for a layer never calibrated)."""
        layer = self._check_layer(layer)
        return self.dense[layer] | ~self.calibrated[layer]

    def params_for_layer(self, layer: int, *, attention_sink: bool = False, is_causal: bool = False) -> SpargeParams:
        """SpargeParams with per-head tensors for `layer` (dense heads: threshold 1.0 and
        simthreshd1 1.0, i.e. every block kept). The same object is returned on every call for
        the same arguments, so its per-device tensor cache is reused (no host-to-device copy
        and stream sync per attention call)."""
        layer = self._check_layer(layer)
        key = (layer, bool(attention_sink), bool(is_causal))
        cache = self.__dict__.setdefault("_params_cache", {})
        if key not in cache:
            dense = self.dense_heads(layer)
            thr = torch.where(dense, torch.full_like(self.threshold[layer], DENSE_THRESHOLD), self.threshold[layer])
            sim = self.simthreshd1[layer]
            sim = torch.where(dense, torch.full_like(sim, DENSE_SIMTHRESHD1), sim)
            kw = {_THRESHOLD_NAME[self.mode]: thr.clone()}
            cache[key] = SpargeParams(simthreshd1=sim.clone(), pvthreshd=self.pvthreshd[layer].clone(),
                                      scoring=self.scoring, attention_sink=bool(attention_sink),
                                      is_causal=bool(is_causal), fill_skipped=self.fill_skipped, **kw)
        return cache[key]

    def note_for(self, n_tokens: int, grid: Optional[tuple] = None) -> Optional[str]:
        """None when a call of n_tokens (and grid) matches the calibration; else a note for the user."""
        n_tokens = int(n_tokens)
        grid = tuple(int(g) for g in grid) if grid is not None else None
        notes = []
        if n_tokens != self.n_tokens:
            ratio = n_tokens / self.n_tokens
            how = ("CDF thresholds are fractions of attention mass and usually carry over"
                   if self.mode == "cdf" else
                   "top-k keeps a fixed FRACTION of key blocks, i.e. more blocks at more tokens; "
                   "it carries over less well")
            notes.append(f"this profile was calibrated at {self.n_tokens:,} tokens"
                         f"{f' (grid {self.grid[0]}x{self.grid[1]}x{self.grid[2]})' if self.grid else ''}; "
                         f"this call has {n_tokens:,} ({ratio:.2f}x). {how}, but the measured error "
                         f"({float(self.rel_l1.max()):.3f} worst layer, target {self.target_l1:g}) was not measured at "
                         f"this size: calibrate again at this resolution for a measured error")
        elif grid is not None and self.grid is not None and grid != self.grid:
            notes.append(f"this profile was calibrated on grid {self.grid}, this call has grid {grid}")
        if (grid is None) != (self.grid is None) and n_tokens == self.n_tokens:
            notes.append(f"this profile was calibrated in {self.token_order} token order but this call uses "
                         f"{'hilbert' if grid is not None else 'raster'} order; the thresholds may not fit")
        return " ".join(notes) if notes else None

    def summary(self) -> str:
        n_dense = int(self.dense[self.calibrated].sum())
        n_heads = int(self.calibrated.sum()) * self.heads
        return (f"{self.model_family}: {self.layers} layers x {self.heads} heads, {self.mode}/{self.scoring}"
                f"{' + fill' if self.fill_skipped else ''}, "
                f"target rel-L1 {self.target_l1:g} at {self.n_tokens:,} tokens; sampled sparsity "
                f"{float(self.sparsity[self.calibrated].mean()) if n_heads else 0.0:.3f}, rel-L1 "
                f"{float(self.rel_l1[self.calibrated].max()) if n_heads else 0.0:.3f} (worst layer), "
                f"{n_dense}/{n_heads} heads dense")

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict:
        meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION),
            "heads": str(self.heads), "layers": str(self.layers),
            "grid": json.dumps(list(self.grid) if self.grid is not None else None),
            "target_l1": repr(float(self.target_l1)), "token_order": self.token_order,
            "fill_skipped": "1" if self.fill_skipped else "0",
        }
        for name in _META_INT:
            if name not in meta:
                meta[name] = str(int(getattr(self, name)))
        for name in _META_STR:
            if name not in meta:
                meta[name] = str(getattr(self, name))
        return meta

    def tensors(self) -> dict:
        out = {_THRESHOLD_NAME[self.mode]: self.threshold}
        out.update({name: getattr(self, name) for name in _TENSORS})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path) -> None:
        from safetensors.torch import save_file

        self.validate()
        save_file(self.tensors(), os.fspath(path), metadata=self.metadata())

    @classmethod
    def load(cls, path, expect_heads: Optional[int] = None, expect_layers: Optional[int] = None) -> "SpargeProfile":
        """Read and check a profile. Raises ValueError (message names the file and the problem)."""
        path = os.fspath(path)
        data = read_bytes(path)
        header, meta = parse_header(data, path)
        tensors = _load_tensors(data, path)
        return cls._from_parts(tensors, meta, path, expect_heads, expect_layers)

    @classmethod
    def _from_parts(cls, tensors: dict, meta: dict, path, expect_heads, expect_layers) -> "SpargeProfile":
        if meta.get("format") != FORMAT:
            _fail(path, f"not a Sparge Attention profile (metadata 'format' is {meta.get('format')!r}, "
                        f"expected {FORMAT!r})")
        ver = _meta_int(meta, "format_version", path)
        if ver < 1 or ver > FORMAT_VERSION:
            _fail(path, f"format version {ver} is not supported (this pack reads up to {FORMAT_VERSION}); "
                        "update the node pack")
        for name in _META_INT + _META_STR + ("grid", "target_l1"):
            if name not in meta:
                _fail(path, f"metadata {name!r} is missing")
        ints = {name: _meta_int(meta, name, path) for name in _META_INT}
        mode = meta["mode"]
        if mode not in _THRESHOLD_NAME:
            _fail(path, f"metadata mode must be 'cdf' or 'topk', got {mode!r}")
        tname = _THRESHOLD_NAME[mode]
        want = {tname, *_TENSORS}
        missing = sorted(want - set(tensors))
        if missing:
            _fail(path, f"missing tensor(s) {missing} (mode {mode!r} needs {sorted(want)})")
        extra = sorted(set(tensors) - want)
        if extra:
            _fail(path, f"unexpected tensor(s) {extra} (mode {mode!r} expects {sorted(want)})")
        L, H = ints["layers"], ints["heads"]
        if L < 1 or H < 1:
            _fail(path, f"metadata says {L} layers and {H} heads; both must be >= 1")
        # metadata must tell the truth about the tensors
        for name in sorted(want):
            x = tensors[name]
            kind = _LH if name == tname else _TENSORS[name][1]
            dtype = torch.float32 if name == tname else _TENSORS[name][0]
            if x.dtype != dtype:
                _fail(path, f"tensor {name!r} has dtype {x.dtype}, expected {dtype}")
            shape = (L, H) if kind == _LH else (L,)
            if tuple(x.shape) != shape:
                _fail(path, f"metadata says {L} layers x {H} heads but tensor {name!r} has shape {tuple(x.shape)}")
        if expect_heads is not None and H != int(expect_heads):
            _fail(path, f"profile is for {H} heads per layer but the model has {int(expect_heads)}")
        if expect_layers is not None and L != int(expect_layers):
            _fail(path, f"profile is for {L} layers but the model has {int(expect_layers)}")
        try:
            grid = json.loads(meta["grid"])
        except ValueError:
            _fail(path, f"metadata grid {meta['grid']!r} is not valid JSON")
        if grid is not None and (not isinstance(grid, list) or len(grid) != 3
                                 or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)):
            _fail(path, f"metadata grid must be null or three integers, got {meta['grid']!r}")
        try:
            target = float(meta["target_l1"])
        except ValueError:
            _fail(path, f"metadata target_l1 {meta['target_l1']!r} is not a number")
        fill = meta.get("fill_skipped", "0")  # absent in files written before the estimate existed
        if fill not in ("0", "1"):
            _fail(path, f"metadata fill_skipped must be '0' or '1', got {fill!r}")
        order = meta["token_order"]
        if order != ("hilbert" if grid is not None else "raster"):
            _fail(path, f"metadata token_order {order!r} does not match grid {meta['grid']}")
        prof = cls.__new__(cls)
        values = dict(
            mode=mode, scoring=meta["scoring"], threshold=tensors[tname],
            **{name: tensors[name] for name in _TENSORS},
            model_family=meta["model_family"], n_tokens=ints["n_tokens"], grid=tuple(grid) if grid else None,
            target_l1=target, steps=ints["steps"], calls=ints["calls"], block_q=ints["block_q"],
            block_k=ints["block_k"], pv_dtype=meta["pv_dtype"], sample_query_blocks=ints["sample_query_blocks"],
            combine=meta["combine"], pack_version=meta["pack_version"], fill_skipped=fill == "1",
        )
        for k, v in values.items():
            setattr(prof, k, v)
        prof.validate(path)
        return prof
