"""Realistic video-attention inputs for benchmarking sparse attention.

Why this exists
---------------
Random i.i.d. q/k are degenerate for every sparse-attention method: every softmax row is
almost uniform (logits ~ N(0, 1) over tens of thousands of keys), no key block matters more
than any other, pooled block means are ~0, and any "sparsity vs error" figure measured on
them says nothing about a real video DiT.  Real Wan / HunyuanVideo self-attention has
structure: most of a row's mass sits in a small fraction of key blocks, heads differ in
*where* they look (own frame, same pixel in other frames, 3D neighbourhood, semantic
matches, sinks), and Wan's 3D RoPE imprints relative-position structure on every head.
This module synthesises q, k, v with those properties from a seed, without model weights,
at the real shapes, in raster token order (t, h, w), text tokens (if any) last.

What goes into ``make_video_qkv`` and why
----------------------------------------
1. **A latent "video" feature field** F(t, h, w) in R^C on the (T, H, W) token grid:
   - a DC vector (real activations share a large mean);
   - random Fourier modes at three spatial scales (wavelengths ~3, ~8 and ~25 tokens) with a
     1/f-like amplitude spectrum, drifting in time (camera motion): neighbouring tokens are
     correlated, as latent video is, but not identical;
   - a sky/ground style region split (large semantic segments);
   - a few moving objects (soft discs with their own feature vector and texture, moving on
     straight paths): they persist over frames, so temporal and semantic heads have
     something real to find in other frames and elsewhere in the frame;
   - a little per-token noise (fine texture, diffusion noise).
2. **Per-head projections** of F to q, k, v (the W_q, W_k, W_v of a layer), with W_k
   correlated with W_q so that similar content gives large q.k (semantic matching).  Less
   content goes to the highest-frequency rotary pairs (trained RoPE models keep semantics
   in the slow pairs, where rotation does not scramble it).
3. **A positional component** per head: a constant vector added to every video q and k
   before RoPE.  After RoPE its contribution to q_i.k_j is sum_f a_f cos(omega_f (p_i - p_j)),
   a relative-position kernel peaked at distance zero: this is how trained RoPE models make
   heads local.  Which axes (t/h/w) and which frequency bands get the energy sets the head
   type and the kernel width.
4. **Biases**: a large constant bias on every video key and a small one on every query,
   both in the slowest rotary pairs (which RoPE hardly turns).  The key bias is the "K has a
   large shared mean" effect that SageAttention-style smoothing removes: it leaves softmax
   unchanged but makes raw keys of a compact block look alike.  The query bias gives all
   queries a shared preference for some keys (and for text keys, see 7).
5. **RMSNorm + gain**: Wan applies RMSNorm to q and k; each token is normalised, then scaled
   by a per-head gain of ~1.1-1.4 (the learned norm weight), so q and k have per-dim rms
   ~1.3; a row's largest logit q.k/sqrt(D) sits ~7 (global heads) to ~13 (local heads)
   above its median: rows are clearly peaked (the top key holds ~0.03-0.06 of the mass in
   local heads at 32K tokens) but not one-hot.
6. **Wan 2.1's actual 3D RoPE** (head_dim split into t/h/w parts of d-4*(d//6), 2*(d//6),
   2*(d//6) channels = 44/42/42 at d=128, theta 10000, omega_j = theta^(-2j/dim) per axis,
   consecutive channel pairs rotated, integer grid positions from 0), written here to match
   ComfyUI's ``EmbedND`` + ``apply_rope1`` (the tests compare against a local ComfyUI when one
   is present).  RoPE is what decorrelates neighbouring keys in raster order and so lowers
   block self-similarity; a benchmark without it flatters mean-pooled block predictors.
7. **Head types** (labels in ``info['head_types']``; 12 heads get 3 spatial, 3 local,
   2 temporal, 2 global, 2 sink; any mix via ``head_types``):
   - ``spatial``: sharp t-kernel plus broad h/w kernels -> mostly its own frame;
   - ``local``: moderate kernels on all three axes -> a 3D neighbourhood;
   - ``temporal``: h/w kernels only -> the same (h, w) in every frame, a "temporal stripe"
     that in raster order touches a few blocks in every frame;
   - ``global``: little positional energy, mostly content, lower gain -> diffuse, semantic;
     these need most key blocks and dominate the error of sparse methods;
   - ``sink``: all queries share a direction u (slowest rotary pairs) and one or a few keys
     (token 0; the first text token when there is text; sometimes a "register" token in the
     first frame) get beta * u added, beta calibrated on 128 sampled rows so those keys take
     ~40-60% of a row's mass.  With q/k RMSNorm a key cannot be huge: the sink key's norm is
     only ~1.1-1.2x the others, its pull comes from alignment.  Mean-pooling a 64-token block
     dilutes it 64-fold, which is what a block predictor must survive.
8. **Text tokens** (``n_text`` > 0, HunyuanVideo-style joint attention): appended after the
   video tokens, built from object features (the prompt names the objects), a text mean and
   noise; no RoPE, no positional component; their keys carry the query-bias direction, so
   video queries send some mass to text (most in global heads).
9. **v**: a projection of the same content field plus noise (smooth, per-dim rms ~1).

Everything random is drawn from one CPU ``torch.Generator`` seeded with ``seed`` (small
parameter tensors plus an (N, D) noise basis per batch element), then the heavy work runs on
``device`` in fp32, one head at a time; CPU and GPU results agree to ~2e-6.  The attention
matrix is never materialised.  Batch elements share the "weights" (head parameters) and get
different videos.  Timings: Wan 480p (1 x 12 x 32,760 x 128) in ~0.1 s on an H100 and ~9 s on
2 CPU cores; HunyuanVideo 544p + 256 text (1 x 24 x 67,576 x 128) in ~0.2 s on an H100.

Calibration (raster order, blocks 128 x 64, oracle block mask = the key blocks holding 90% /
95% of each query block's mass): at the Wan shape the 12-head mean density is 0.23 / 0.34
with relative L1 0.057 / 0.031, i.e. ~0.74 sparsity at rel-L1 0.05, close to what oracle masks
reach on real video DiTs; local/spatial/temporal/sink heads need 0.10-0.24 of the blocks for
90%, global heads ~0.6.  With the mean-subtracted keys, no raster 64-key block has mean
pairwise cosine > 0.6 while ~35-70% of compact 4x4x4 blocks do.

``attention_stats`` measures what matters for block-sparse attention on a sample of query
blocks (exact fp32 softmax over all keys, a chunk of rows at a time): the fraction of key
blocks needed to cover 90% / 95% of each row's mass and of each query block's mass, the
oracle-mask error (given v), the top-1 key mass, and locality (mass in the query's frame,
in its spatial neighbourhood in any frame, in its 3D neighbourhood, on text tokens).  Pass
permuted q/k with the matching ``positions`` to measure another token order.

Run ``python devkit/realistic_inputs.py --grid 6 16 20 --heads 6`` for a table
(``--device cuda``, ``--n-text 256``, ``--grid 21 30 52 --heads 12`` for the Wan shape).
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "HEAD_TYPES",
    "DEFAULT_HEAD_CYCLE",
    "wan_rope_axes_dims",
    "wan_rope_angles",
    "apply_rope",
    "grid_positions",
    "make_video_qkv",
    "attention_stats",
    "format_stats",
    "REGIMES",
    "make_regime_qkv",
]

HEAD_TYPES = ("spatial", "local", "temporal", "global", "sink")
# Order in which head types are assigned; 12 heads (Wan 1.3B) get 3 spatial, 3 local,
# 2 temporal, 2 global, 2 sink.  The first four cover four different types.
DEFAULT_HEAD_CYCLE = (
    "spatial", "temporal", "local", "global", "sink", "spatial",
    "local", "temporal", "spatial", "global", "local", "sink",
)


# ----------------------------------------------------------------------------------------
# Wan 2.1 3D RoPE
# ----------------------------------------------------------------------------------------

def wan_rope_axes_dims(head_dim: int) -> Tuple[int, int, int]:
    """Channel split of Wan 2.1's 3D RoPE: (t, h, w) = (d - 4*(d//6), 2*(d//6), 2*(d//6))."""
    d6 = head_dim // 6
    dims = (head_dim - 4 * d6, 2 * d6, 2 * d6)
    if any(x % 2 for x in dims) or head_dim % 2:
        raise ValueError(f"head_dim {head_dim} gives odd RoPE axis dims {dims}")
    return dims


def _axis_omega(dim: int, theta: float) -> torch.Tensor:
    # omega_j = 1 / theta ** (2j / dim), j = 0 .. dim/2 - 1  (float64, as ComfyUI computes it)
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / (theta ** scale)


def wan_rope_angles(positions: torch.Tensor, head_dim: int = 128, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles, shape (N, head_dim // 2), for integer positions (N, 3) = (t, h, w).

    Pair j of the t part rotates by t * omega_t[j], then the h part, then the w part
    (ComfyUI's EmbedND concatenates the axes in this order along the pair dimension).
    """
    positions = positions.to(torch.float64)
    parts = []
    for axis, dim in enumerate(wan_rope_axes_dims(head_dim)):
        omega = _axis_omega(dim, theta).to(positions.device)
        parts.append(positions[:, axis:axis + 1] * omega[None, :])
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x[2j], x[2j+1]) of x (..., N, D) by angles (N, D/2).

    out[2j]   = cos * x[2j] - sin * x[2j+1]
    out[2j+1] = sin * x[2j] + cos * x[2j+1]
    (the same as ComfyUI's apply_rope with its [[cos, -sin], [sin, cos]] matrices).
    Computed in fp32 (angles in fp64 first, as ComfyUI), returned in x's dtype.
    """
    cos = torch.cos(angles).to(torch.float32)
    sin = torch.sin(angles).to(torch.float32)
    xf = x.to(torch.float32)
    x0 = xf[..., 0::2]
    x1 = xf[..., 1::2]
    out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
    return out.reshape(x.shape).to(x.dtype)


def grid_positions(grid: Sequence[int], n_text: int = 0, device="cpu") -> torch.Tensor:
    """(N, 3) long tensor of (t, h, w) for raster order, then n_text rows of -1 (text)."""
    T, H, W = (int(g) for g in grid)
    idx = torch.arange(T * H * W, device=device)
    pos = torch.stack((idx // (H * W), (idx // W) % H, idx % W), dim=1)
    if n_text:
        pos = torch.cat((pos, torch.full((n_text, 3), -1, dtype=pos.dtype, device=device)), 0)
    return pos


# ----------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------

# Per-type recipes (energies are shares of the pre-norm vector, each component unit-rms):
#   pos_axes: per axis t/h/w, (strength, f0, decay): share of the positional energy on that
#       axis; it starts at rotary pair f0 of the axis (0 = highest frequency, 1 rad/token) and
#       falls off as exp(-(f - f0) / decay).  Small f0/decay = short, sharp kernel.
#   e_pos, e_con, e_noise: positional / content / per-token-noise energy of q and k;
#   e_qdc, e_kdc: a constant bias in the low-frequency rotary pairs (RoPE barely rotates it):
#       small for q, large for k ("K has a large shared mean", which SageAttention-style
#       smoothing removes; it does not change softmax but makes compact key blocks similar);
#   e_sink: energy of the shared sink direction in q (sink heads);
#   e_txt: text keys carry the query bias direction with this energy (cross-modal attention);
#   gain: per-dim rms of q and k after the RMSNorm (learned norm weight); rho: corr(W_k, W_q).
_RECIPES: Dict[str, dict] = {
    "spatial": dict(pos_axes=((0.55, 0, 1.5), (0.225, 2, 3.0), (0.225, 2, 3.0)),
                    e_pos=0.45, e_con=0.40, e_noise=0.02, e_qdc=0.10, e_kdc=0.5, e_sink=0.0,
                    e_txt=0.3, gain=1.3, rho=0.7),
    "local": dict(pos_axes=((0.30, 1, 2.5), (0.35, 2, 2.5), (0.35, 2, 2.5)),
                  e_pos=0.45, e_con=0.40, e_noise=0.02, e_qdc=0.10, e_kdc=0.5, e_sink=0.0,
                  e_txt=0.3, gain=1.3, rho=0.7),
    "temporal": dict(pos_axes=((0.0, 0, 1.0), (0.50, 1, 2.5), (0.50, 1, 2.5)),
                     e_pos=0.45, e_con=0.40, e_noise=0.02, e_qdc=0.10, e_kdc=0.5, e_sink=0.0,
                     e_txt=0.3, gain=1.3, rho=0.7),
    "global": dict(pos_axes=((0.34, 1, 4.0), (0.33, 1, 4.0), (0.33, 1, 4.0)),
                   e_pos=0.10, e_con=0.75, e_noise=0.02, e_qdc=0.20, e_kdc=0.5, e_sink=0.0,
                   e_txt=1.5, gain=1.1, rho=0.8),
    "sink": dict(pos_axes=((0.30, 1, 2.5), (0.35, 2, 2.5), (0.35, 2, 2.5)),
                 e_pos=0.30, e_con=0.30, e_noise=0.02, e_qdc=0.0, e_kdc=0.5, e_sink=0.35,
                 e_txt=0.3, gain=1.3, rho=0.7),
}

_SINK_PAIRS_PER_AXIS = 3       # lowest-frequency rotary pairs of each axis carry the sink direction
_DC_PAIRS_FROM = 0.5           # q/k biases live in the lower-frequency half of each axis' pairs
_CONTENT_HF_CUT = 0.7          # content energy removed from the highest-frequency pair (decays by pair)
_SINK_TARGET_MASS = (0.40, 0.60)


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _unif(gen, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float32)


def _pair_slices(head_dim: int) -> List[Tuple[int, int]]:
    """(start_pair, n_pairs) of the t, h, w parts of the rotary pairs."""
    out, start = [], 0
    for dim in wan_rope_axes_dims(head_dim):
        out.append((start, dim // 2))
        start += dim // 2
    return out


def _content_params(gen, C: int, grid, n_text: int) -> dict:
    """Random parameters of one video's latent feature field (small tensors)."""
    T, H, W = grid
    p = {}
    p["dc"] = _rand(gen, C) * 0.8
    # Fourier modes at three spatial scales (wavelength in tokens), 1/f-like amplitudes.
    modes_k, modes_phase, modes_vel, modes_vec = [], [], [], []
    for wavelength, amp, n in ((25.0, 1.0, 12), (8.0, 0.6, 16), (3.0, 0.3, 16)):
        ang = _unif(gen, 0, 2 * math.pi, n)
        mag = (2 * math.pi / wavelength) * _unif(gen, 0.7, 1.4, n)
        kh, kw = mag * torch.sin(ang), mag * torch.cos(ang)
        modes_k.append(torch.stack((kh, kw), 1))
        modes_phase.append(_unif(gen, 0, 2 * math.pi, n))
        modes_vel.append(_rand(gen, n, 2) * 0.4)   # tokens/frame drift (camera motion)
        modes_vec.append(_rand(gen, n, C) * amp / math.sqrt(n) * 2.0)
    p["modes_k"] = torch.cat(modes_k)
    p["modes_phase"] = torch.cat(modes_phase)
    p["modes_vel"] = torch.cat(modes_vel)
    p["modes_vec"] = torch.cat(modes_vec)
    # Region split ("sky" vs "ground"): a tilted, slowly moving horizon.
    p["horizon"] = torch.tensor([_unif(gen, 0.3, 0.6, 1).item() * H, _unif(gen, -0.3, 0.3, 1).item(),
                                 _unif(gen, -0.1, 0.1, 1).item()])
    p["region_vec"] = _rand(gen, 2, C) * 0.9
    # Moving objects: centre, velocity, radius, feature vector, texture vector.
    n_obj = 5
    p["obj_c0"] = torch.stack((_unif(gen, 0, H, n_obj), _unif(gen, 0, W, n_obj)), 1)
    p["obj_vel"] = _rand(gen, n_obj, 2) * 0.6
    p["obj_r"] = _unif(gen, 0.08, 0.22, n_obj) * min(H, W) + 1.0
    p["obj_vec"] = _rand(gen, n_obj, C) * 1.3
    p["obj_tex"] = _rand(gen, n_obj, C) * 0.4
    p["obj_tex_k"] = _rand(gen, n_obj, 2) * 0.8
    p["tok_noise_amp"] = 0.25
    # Text tokens: a text mean + mostly object descriptions + noise.
    if n_text:
        p["txt_mean"] = _rand(gen, C) * 0.8
        which = torch.randint(0, n_obj, (n_text,), generator=gen)
        p["txt_obj"] = which
        p["txt_mix"] = _unif(gen, 0.3, 1.0, n_text)
        p["txt_noise"] = _rand(gen, n_text, C) * 0.6
    return p


def _content_field(p: dict, grid, n_text: int, gen_noise: torch.Tensor, device) -> torch.Tensor:
    """(N, C) features for one video (+ text rows).  gen_noise: (N_video, C) pre-drawn."""
    T, H, W = grid
    pos = grid_positions(grid, 0, device).to(torch.float32)
    t, h, w = pos[:, 0:1], pos[:, 1:2], pos[:, 2:3]
    F = p["dc"].to(device)[None, :].expand(pos.shape[0], -1).clone()
    k = p["modes_k"].to(device)
    vel = p["modes_vel"].to(device)
    # phase = k . (x - vel * t) + phase0
    ph = (h - vel[None, :, 0] * t) * k[None, :, 0] + (w - vel[None, :, 1] * t) * k[None, :, 1]
    ph = ph + p["modes_phase"].to(device)[None, :]
    F = F + torch.cos(ph) @ p["modes_vec"].to(device)
    # Region split.
    hz = p["horizon"].to(device)
    line = hz[0] + hz[1] * (w - W / 2) + hz[2] * t
    sky = torch.sigmoid((line - h) * 1.5)
    rv = p["region_vec"].to(device)
    F = F + sky * rv[0][None, :] + (1 - sky) * rv[1][None, :]
    # Moving objects (occlude what is behind: blend towards the object's features).
    c0, ov, r = p["obj_c0"].to(device), p["obj_vel"].to(device), p["obj_r"].to(device)
    for o in range(c0.shape[0]):
        ch = c0[o, 0] + ov[o, 0] * t
        cw = c0[o, 1] + ov[o, 1] * t
        dist = torch.sqrt((h - ch) ** 2 + (w - cw) ** 2)
        m = torch.sigmoid((r[o] - dist) * 1.5)
        tk = p["obj_tex_k"][o].to(device)
        tex = torch.cos((h - ch) * tk[0] + (w - cw) * tk[1])
        obj = p["obj_vec"][o].to(device)[None, :] + tex * p["obj_tex"][o].to(device)[None, :]
        F = F * (1 - m) + m * obj
    F = F + p["tok_noise_amp"] * gen_noise.to(device)
    if n_text:
        txt = p["txt_mean"].to(device)[None, :] + p["txt_mix"].to(device)[:, None] * \
            p["obj_vec"].to(device)[p["txt_obj"].to(device)] + p["txt_noise"].to(device)
        F = torch.cat((F, txt), 0)
    return F


def _positional_vector(gen, head_dim: int, pos_axes) -> torch.Tensor:
    """Unit-rms constant vector (D,) whose energy sits in rotary pairs as pos_axes says."""
    n_pairs = head_dim // 2
    energy = torch.zeros(n_pairs)
    for (start, n), (strength, f0, decay) in zip(_pair_slices(head_dim), pos_axes):
        if strength <= 0:
            continue
        f = torch.arange(n, dtype=torch.float32)
        wgt = torch.exp(-(f - f0).abs() / decay) * _unif(gen, 0.7, 1.3, n)
        energy[start:start + n] = strength * wgt / wgt.sum()
    ang = _unif(gen, 0, 2 * math.pi, n_pairs)
    mag = torch.sqrt(energy / energy.sum().clamp_min(1e-12) * head_dim)
    return torch.stack((mag * torch.cos(ang), mag * torch.sin(ang)), 1).reshape(head_dim)


def _low_freq_vector(gen, head_dim: int) -> torch.Tensor:
    """Unit-rms random vector in the lower-frequency half of every axis' rotary pairs."""
    x = torch.zeros(head_dim)
    for start, n in _pair_slices(head_dim):
        lo = start + int(n * _DC_PAIRS_FROM)
        x[2 * lo: 2 * (start + n)] = _rand(gen, 2 * (start + n - lo))
    return x / x.pow(2).mean().sqrt()


def _content_channel_weights(head_dim: int) -> torch.Tensor:
    """(D,) weights: less content energy in the highest-frequency rotary pairs."""
    w = torch.ones(head_dim // 2)
    for start, n in _pair_slices(head_dim):
        f = torch.arange(n, dtype=torch.float32)
        w[start:start + n] = torch.sqrt(1.0 - _CONTENT_HF_CUT * torch.exp(-f / 2.0))
    return w.repeat_interleave(2)


def _sink_direction(gen, head_dim: int) -> torch.Tensor:
    """Unit vector in the lowest-frequency rotary pairs of every axis (RoPE-invariant)."""
    u = torch.zeros(head_dim)
    for start, n in _pair_slices(head_dim):
        lo = start + n - _SINK_PAIRS_PER_AXIS
        u[2 * lo: 2 * (start + n)] = _rand(gen, 2 * _SINK_PAIRS_PER_AXIS)
    return u / u.norm()


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _head_params(gen, htype: str, C: int, D: int) -> dict:
    r = dict(_RECIPES[htype])
    r["type"] = htype
    jit = lambda: float(_unif(gen, 0.85, 1.15, 1))  # noqa: E731  per-head variety
    r["gain"] = r["gain"] * math.sqrt(jit())
    r["e_pos"] = r["e_pos"] * jit()
    r["e_con"] = r["e_con"] * jit()
    r["pos_axes"] = tuple((s, f0, dcy * float(_unif(gen, 0.8, 1.25, 1))) for s, f0, dcy in r["pos_axes"])
    P = _positional_vector(gen, D, r["pos_axes"])
    # k's positional vector: the same, each pair turned by a small phase (slightly
    # off-centre kernels, as trained heads have).
    phase = _rand(gen, D // 2) * 0.15
    Pp = P.reshape(D // 2, 2)
    c, s = torch.cos(phase), torch.sin(phase)
    r["P_q"] = P
    r["P_k"] = torch.stack((c * Pp[:, 0] - s * Pp[:, 1], s * Pp[:, 0] + c * Pp[:, 1]), 1).reshape(D)
    cw = _content_channel_weights(D)[None, :]
    Wq = _rand(gen, C, D) / math.sqrt(C)
    Wk = r["rho"] * Wq + math.sqrt(1 - r["rho"] ** 2) * _rand(gen, C, D) / math.sqrt(C)
    r["W_q"], r["W_k"] = Wq * cw, Wk * cw
    r["W_v"] = _rand(gen, C, D) / math.sqrt(C)
    r["N_q"] = _rand(gen, D, D) / math.sqrt(D)
    r["N_k"] = _rand(gen, D, D) / math.sqrt(D)
    r["N_v"] = _rand(gen, D, D) / math.sqrt(D)
    r["dc_q"] = _low_freq_vector(gen, D)
    r["dc_k"] = _low_freq_vector(gen, D)
    r["u"] = _sink_direction(gen, D) if htype == "sink" else None
    r["sink_target"] = float(_unif(gen, *_SINK_TARGET_MASS, 1)) if htype == "sink" else 0.0
    r["sink_extra"] = int(torch.randint(0, 2, (1,), generator=gen)) if htype == "sink" else 0
    r["sink_extra_pick"] = float(_unif(gen, 0.0, 1.0, 1))
    return r


def _unit_rms_cols(x: torch.Tensor, n_video: int) -> torch.Tensor:
    # Scale so that the video rows have per-dim rms 1 (one scalar; keeps relative structure).
    return x / x[:n_video].pow(2).mean().sqrt().clamp_min(1e-6)


def _calibrate_sink_scale(q: torch.Tensor, k: torch.Tensor, sink_idx: List[int], sink_dirs: torch.Tensor,
                          target: float, sample_idx: torch.Tensor) -> float:
    """beta such that adding beta * sink_dirs[j] to key sink_idx[j] gives the sampled query
    rows a median attention mass of ``target`` on the sink keys together."""
    D = q.shape[-1]
    qs = q[sample_idx]                                   # (S, D), S small: no N^2 anywhere
    logits = (qs @ k.T) / math.sqrt(D)                   # (S, N)
    keep = torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
    keep[sink_idx] = False
    lse_rest = torch.logsumexp(logits[:, keep], dim=1)   # everything but the sinks
    base = logits[:, sink_idx]                           # the sinks' ordinary logits
    a = (qs @ sink_dirs.T) / math.sqrt(D)                # (S, n_sinks) per unit beta

    def median_mass(beta):
        s = torch.logsumexp(base + a * beta, dim=1)
        return torch.sigmoid(s - lse_rest).median().item()

    lo, hi = 0.0, 8.0 * math.sqrt(D)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if median_mass(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@torch.no_grad()
def make_video_qkv(grid: Sequence[int] = (21, 30, 52), heads: int = 12, head_dim: int = 128, batch: int = 1,
                   n_text: int = 0, seed: int = 0, device="cpu", dtype=torch.bfloat16,
                   head_types: Optional[Sequence[str]] = None, theta: float = 10000.0,
                   content_channels: int = 32, noise_level: float = 0.0):
    """Synthesise realistic video self-attention inputs (see the module docstring).

    ``noise_level`` sigma in [0, 1]: the video's content field is (1 - sigma) F + sigma E before
    the projections, E a fixed Gaussian field drawn from ``seed`` (as a flow-matching sampler's
    x_t = (1 - sigma) x_0 + sigma eps with one eps per run), so calls with the same seed and
    falling sigma are one layer's inputs along a denoising trajectory; the text rows' content,
    the "model weights" and the positional parts stay as they are.  0 (the default) leaves every input as
    it was.  (A real model also modulates its activations by the timestep; not modelled.)

    Returns (q, k, v, info) with q, k, v of shape (batch, heads, N, head_dim) in ``dtype``
    on ``device``; tokens in raster (t, h, w) order, N = T*H*W + n_text with the text tokens
    last.  q and k already carry Wan's 3D RoPE (text tokens excluded).  ``head_types``
    overrides the default assignment (one name from HEAD_TYPES per head).

    ``info``: ``grid``, ``n_video``, ``n_text``, ``head_types`` (list of names),
    ``sink_tokens`` (per head, token indices of the sink keys; empty for non-sink heads),
    ``sink_key_norm`` (per batch element and head, the norm beta of the sink part added to
    those keys), ``positions`` ((N, 3) long, t/h/w, -1 rows for text), ``rope_axes_dims``,
    ``rope_theta``, ``seed``, ``recipes`` (per head, the scalar parameters used),
    ``token_order`` ("raster").
    """
    T, H, W = (int(g) for g in grid)
    grid = (T, H, W)
    n_video = T * H * W
    N = n_video + int(n_text)
    D = int(head_dim)
    C = int(content_channels)
    wan_rope_axes_dims(D)  # validates head_dim
    if head_types is None:
        head_types = [DEFAULT_HEAD_CYCLE[i % len(DEFAULT_HEAD_CYCLE)] for i in range(heads)]
    head_types = list(head_types)
    if len(head_types) != heads or any(t not in _RECIPES for t in head_types):
        raise ValueError(f"head_types must be {heads} names from {HEAD_TYPES}, got {head_types}")
    device = torch.device(device)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    hp = [_head_params(gen, t, C, D) for t in head_types]          # "model weights"
    per_batch = []
    for _ in range(batch):
        cp = _content_params(gen, C, grid, n_text)
        feat_noise = _rand(gen, n_video, C)
        tok_noise = _rand(gen, N, D)
        sample_idx = torch.randint(0, N, (128,), generator=gen)
        per_batch.append((cp, feat_noise, tok_noise, sample_idx))

    pos = grid_positions(grid, n_text, device)
    angles = wan_rope_angles(pos[:n_video], D, theta)
    q_out = torch.empty(batch, heads, N, D, dtype=dtype, device=device)
    k_out = torch.empty_like(q_out)
    v_out = torch.empty_like(q_out)
    sink_tokens: List[List[int]] = [[] for _ in range(heads)]
    sink_scale: List[List[float]] = [[0.0] * heads for _ in range(batch)]   # |sink part of key|

    if not 0.0 <= noise_level <= 1.0:
        raise ValueError(f"noise_level must be in [0, 1], got {noise_level}")
    eps_gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)  # apart from `gen`: sigma 0 unchanged
    for b, (cp, feat_noise, tok_noise, sample_idx) in enumerate(per_batch):
        F = _content_field(cp, grid, n_text, feat_noise, device)          # (N, C)
        F = F / F[:n_video].pow(2).mean().sqrt()
        if noise_level > 0.0:
            mix = (1.0 - noise_level) * F[:n_video] + noise_level * _rand(eps_gen, n_video, C).to(device)
            F[:n_video] = mix / mix.pow(2).mean().sqrt()
        Z = tok_noise.to(device)                                          # (N, D)
        is_video = torch.zeros(N, 1, device=device)
        is_video[:n_video] = 1.0
        for hi, r in enumerate(hp):
            dev = lambda x: x.to(device)  # noqa: E731
            sq = lambda e: math.sqrt(max(e, 0.0))  # noqa: E731
            cq = _unit_rms_cols(F @ dev(r["W_q"]), n_video)
            ck = _unit_rms_cols(F @ dev(r["W_k"]), n_video)
            q = sq(r["e_con"]) * cq + sq(r["e_noise"]) * (Z @ dev(r["N_q"])) \
                + is_video * (sq(r["e_pos"]) * dev(r["P_q"]) + sq(r["e_qdc"]) * dev(r["dc_q"]))[None, :]
            k = sq(r["e_con"]) * ck + sq(r["e_noise"]) * (Z @ dev(r["N_k"])) \
                + is_video * (sq(r["e_pos"]) * dev(r["P_k"]) + sq(r["e_kdc"]) * dev(r["dc_k"]))[None, :] \
                + (1.0 - is_video) * sq(r["e_txt"]) * dev(r["dc_q"])[None, :]   # text keys match the query bias
            if r["u"] is not None:
                u = dev(r["u"])
                # Every query leans towards u (with some spread): the "no-op" direction.
                spread = (1.0 + 0.3 * Z[:, :1]).clamp_min(0.2)
                q = q + sq(r["e_sink"]) * math.sqrt(D) * spread * u[None, :]
                # Ordinary keys get no u component (only the sinks align with it).
                k = k - (k @ u)[:, None] * u[None, :]
            q = _rms_norm(q) * r["gain"]
            k = _rms_norm(k) * r["gain"]
            q[:n_video] = apply_rope(q[:n_video], angles)
            k[:n_video] = apply_rope(k[:n_video], angles)
            if r["u"] is not None:
                sinks = [0]                                   # first video token (RoPE = identity)
                if n_text:
                    sinks.append(n_video)                     # first text token (no RoPE)
                if r["sink_extra"]:
                    # a "register"-like token somewhere in the first frame; its key gets RoPE
                    # like any video key (u sits in the slowest pairs, so it barely turns)
                    sinks.append(int(r["sink_extra_pick"] * (H * W - 1)))
                sinks = sorted(set(sinks))
                dirs = torch.stack([u * (1.0 - 0.1 * s_i) for s_i in range(len(sinks))])
                vid_s = [i for i, tok in enumerate(sinks) if tok < n_video]
                dirs[vid_s] = apply_rope(dirs[vid_s], angles[[sinks[i] for i in vid_s]])
                beta = _calibrate_sink_scale(q, k, sinks, dirs, r["sink_target"], sample_idx.to(device))
                k[sinks] = k[sinks] + beta * dirs   # keeps its ordinary key, plus the sink part
                sink_tokens[hi] = sinks
                sink_scale[b][hi] = beta
            v = _unit_rms_cols(F @ dev(r["W_v"]), n_video) * 0.9 + 0.45 * (Z @ dev(r["N_v"]))
            q_out[b, hi] = q.to(dtype)
            k_out[b, hi] = k.to(dtype)
            v_out[b, hi] = v.to(dtype)

    info = dict(
        grid=grid, n_video=n_video, n_text=int(n_text), head_types=head_types,
        sink_tokens=sink_tokens, sink_key_norm=sink_scale, positions=pos.cpu(),
        rope_axes_dims=wan_rope_axes_dims(D), rope_theta=theta, seed=int(seed),
        recipes=[{k_: v_ for k_, v_ in r.items() if not isinstance(v_, torch.Tensor) and k_ != "u"}
                 for r in hp],
        token_order="raster",
    )
    return q_out, k_out, v_out, info


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------

def _blocks_to_cover(mass: torch.Tensor, thr: float) -> torch.Tensor:
    """mass: (R, NK) non-negative rows summing to ~1 -> number of largest entries to reach thr."""
    srt, _ = torch.sort(mass, dim=1, descending=True)
    cs = torch.cumsum(srt, dim=1)
    total = cs[:, -1:]
    return (cs < thr * total).sum(dim=1) + 1


@torch.no_grad()
def attention_stats(q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_k: int = 64,
                    n_query_blocks_sample: int = 64, seed: int = 0, grid: Optional[Sequence[int]] = None,
                    n_text: int = 0, positions: Optional[torch.Tensor] = None, radius: int = 2,
                    thresholds: Sequence[float] = (0.9, 0.95), batch_index: int = 0,
                    v: Optional[torch.Tensor] = None, rows_per_chunk: int = 1024) -> Dict[str, torch.Tensor]:
    """Per-head block-sparsity and locality statistics of softmax(q k^T / sqrt(D)).

    q, k: (B, H, N, D) in the token order you want measured (blocks are consecutive tokens;
    pass permuted q/k and the matching ``positions`` to measure another order).
    A sample of query blocks (the same for every head, chosen by ``seed``) is evaluated
    exactly: fp32 softmax over all keys, about ``rows_per_chunk`` rows (whole query blocks)
    at a time, so memory is O(rows_per_chunk * N), never N^2.

    Returns a dict of (H,) float tensors (``90``/``95`` follow ``thresholds``):
      ``frac90_row``, ``frac95_row``: mean over sampled query rows of (number of key blocks
          needed to cover that fraction of the row's mass) / NK;
      ``frac90_blk``, ``frac95_blk``: the same for whole query blocks (mass summed over the
          block's rows): the density of an oracle block mask keeping that share of the mass;
      ``top1``: mean largest single-key probability of a row;
      with ``v`` given: ``l1_90``, ``l1_95``: relative L1 error (sum|o - o_ref| / sum|o_ref|
          over the sampled rows) of attention restricted to that oracle block mask, fp32;
      with ``grid`` or ``positions`` (N, 3 of t, h, w; -1 rows = text) given, locality,
      over video query rows: ``same_frame`` (mass on keys in the query's frame),
      ``spatial_r`` (|dh|, |dw| <= radius, any frame), ``local3d_r`` (|dt|, |dh|, |dw| <=
      radius), ``text`` (mass on text keys).
    Plus the scalars ``n_key_blocks`` and ``n_rows``.
    """
    B, Hh, N, D = q.shape
    NQ = math.ceil(N / block_q)
    NK = math.ceil(N / block_k)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    if n_query_blocks_sample >= NQ:
        qblocks = list(range(NQ))
    else:
        qblocks = torch.sort(torch.randperm(NQ, generator=g)[:n_query_blocks_sample]).values.tolist()
    dev = q.device
    if positions is None and grid is not None:
        positions = grid_positions(grid, n_text)
    if positions is not None:
        positions = positions.to(dev)
        if positions.shape[0] != N:
            raise ValueError(f"positions has {positions.shape[0]} rows, expected {N}")
        key_is_text = positions[:, 0] < 0
        vpos = positions[~key_is_text]
        Tg, Hg, Wg = (int(vpos[:, i].max()) + 1 for i in range(3))
        hw_lim = torch.tensor([Hg, Wg], device=dev)
        # grid cell -> token index (-1 where no token), for any token order
        grid_to_token = torch.full((Tg * Hg * Wg,), -1, dtype=torch.long, device=dev)
        vidx = torch.nonzero(~key_is_text).squeeze(1)
        grid_to_token[(vpos[:, 0] * Hg + vpos[:, 1]) * Wg + vpos[:, 2]] = vidx
        key_frame = torch.where(key_is_text, torch.full_like(positions[:, 0], Tg), positions[:, 0])
        # neighbour offsets: |dh|, |dw| <= radius, every dt
        rr = torch.arange(-radius, radius + 1, device=dev)
        tt = torch.arange(-(Tg - 1), Tg, device=dev)
        offsets = torch.stack(torch.meshgrid(tt, rr, rr, indexing="ij"), -1).reshape(-1, 3)
        off_dt = offsets[:, 0].abs()
    pad = NK * block_k - N
    scale = 1.0 / math.sqrt(D)
    names = [f"{int(round(t * 100))}" for t in thresholds]
    out = {f"frac{n}_row": torch.zeros(Hh) for n in names}
    out.update({f"frac{n}_blk": torch.zeros(Hh) for n in names})
    out["top1"] = torch.zeros(Hh)
    if v is not None:
        out.update({f"l1_{n}": torch.zeros(Hh) for n in names})
    loc_keys = ("same_frame", "spatial_r", "local3d_r", "text")
    if positions is not None:
        out.update({key: torch.zeros(Hh) for key in loc_keys})
    blocks_per_chunk = max(1, rows_per_chunk // block_q)
    n_rows = sum(min(N, (b + 1) * block_q) - b * block_q for b in qblocks)
    for h in range(Hh):
        kh = k[batch_index, h].to(torch.float32)
        vh = v[batch_index, h].to(torch.float32) if v is not None else None
        acc = {key: 0.0 for key in out}
        l1_ref = 0.0
        n_loc_rows = 0
        for c0 in range(0, len(qblocks), blocks_per_chunk):
            cb = qblocks[c0:c0 + blocks_per_chunk]
            r_idx = torch.cat([torch.arange(b * block_q, min(N, (b + 1) * block_q)) for b in cb]).to(dev)
            r_blk = torch.cat([torch.full((min(N, (b + 1) * block_q) - b * block_q,), i)
                               for i, b in enumerate(cb)]).to(dev)
            qh = q[batch_index, h, r_idx].to(torch.float32)
            p = torch.softmax((qh @ kh.T) * scale, dim=1)                   # (R, N)
            pb = torch.nn.functional.pad(p, (0, pad)).reshape(p.shape[0], NK, block_k).sum(2)
            bm = torch.zeros(len(cb), NK, dtype=torch.float64, device=dev)
            bm.index_add_(0, r_blk, pb.to(torch.float64))                    # per query block
            srt, order = torch.sort(bm, dim=1, descending=True)
            cs = torch.cumsum(srt, dim=1)
            if vh is not None:
                o_ref = p @ vh
                l1_ref += o_ref.abs().sum().item()
            for t, n in zip(thresholds, names):
                acc[f"frac{n}_row"] += (_blocks_to_cover(pb, t).to(torch.float64) / NK).sum().item()
                n_keep = (cs < t * cs[:, -1:]).sum(dim=1) + 1                # per query block
                acc[f"frac{n}_blk"] += (n_keep.to(torch.float64) / NK).sum().item()
                if vh is not None:
                    keep_sorted = torch.arange(NK, device=dev)[None, :] < n_keep[:, None]
                    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
                    tok_keep = keep.repeat_interleave(block_k, dim=1)[:, :N][r_blk]   # (R, N)
                    pm = p * tok_keep
                    o = (pm @ vh) / pm.sum(1, keepdim=True)
                    acc[f"l1_{n}"] += (o - o_ref).abs().sum().item()
            acc["top1"] += p.max(dim=1).values.sum().item()
            if positions is not None:
                qp = positions[r_idx]
                vid = qp[:, 0] >= 0
                if vid.any():
                    pv, qpv = p[vid], qp[vid]
                    # same frame: mass per key frame, read at the query's frame
                    fr = torch.zeros(pv.shape[0], Tg + 1, device=dev, dtype=pv.dtype)
                    fr.index_add_(1, key_frame, pv)
                    acc["same_frame"] += fr.gather(1, qpv[:, :1]).sum().item()
                    # spatial / 3D neighbourhoods: gather the neighbours' probabilities
                    nb = qpv[:, None, :] + offsets[None, :, :]               # (R, S, 3)
                    ok = ((nb[..., 1:] >= 0) & (nb[..., 1:] < hw_lim)).all(-1)
                    ok = ok & (nb[..., 0] >= 0) & (nb[..., 0] < Tg)
                    flat = (nb[..., 0].clamp(0, Tg - 1) * Hg + nb[..., 1].clamp(0, Hg - 1)) * Wg \
                        + nb[..., 2].clamp(0, Wg - 1)
                    tok = grid_to_token[flat]
                    ok = ok & (tok >= 0)
                    pn = pv.gather(1, tok.clamp_min(0)) * ok
                    acc["spatial_r"] += pn.sum().item()
                    acc["local3d_r"] += (pn * (off_dt <= radius)[None, :]).sum().item()
                    acc["text"] += pv[:, key_is_text].sum().item()
                    n_loc_rows += int(vid.sum())
        for n in names:
            out[f"frac{n}_row"][h] = acc[f"frac{n}_row"] / n_rows
            out[f"frac{n}_blk"][h] = acc[f"frac{n}_blk"] / len(qblocks)
            if vh is not None:
                out[f"l1_{n}"][h] = acc[f"l1_{n}"] / max(l1_ref, 1e-30)
        out["top1"][h] = acc["top1"] / n_rows
        if positions is not None:
            for key in loc_keys:
                out[key][h] = acc[key] / max(n_loc_rows, 1)
    out["n_key_blocks"] = torch.tensor(NK)
    out["n_rows"] = torch.tensor(n_rows)
    return out


def format_stats(stats: Dict[str, torch.Tensor], head_types: Optional[Sequence[str]] = None) -> str:
    """A plain-text table, one line per head, plus per-type means."""
    cols = [c for c in stats if stats[c].dim() == 1]
    Hh = stats[cols[0]].numel()
    head_types = list(head_types) if head_types is not None else ["?"] * Hh
    lines = ["head type      " + " ".join(f"{c:>11s}" for c in cols)]
    for h in range(Hh):
        lines.append(f"{h:4d} {head_types[h]:9s} " + " ".join(f"{stats[c][h].item():11.3f}" for c in cols))
    lines.append("per-type mean")
    for t in dict.fromkeys(head_types):
        idx = [i for i, x in enumerate(head_types) if x == t]
        lines.append(f"  {len(idx):2d}x {t:9s} " + " ".join(f"{stats[c][idx].mean().item():11.3f}" for c in cols))
    lines.append("  all          " + " ".join(f"{stats[c].mean().item():11.3f}" for c in cols))
    lines.append(f"(key blocks: {int(stats['n_key_blocks'])}, sampled query rows: {int(stats['n_rows'])})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Regimes: attention statistics the presets were not tuned on (bench/robustness.py)
# ----------------------------------------------------------------------------------------

# The presets were chosen on "tuned" (the default head mix at Wan 480p); each other regime
# moves one statistic away from it.  Keys: head_cycle (head types, repeated over the heads),
# n_text, grid (full-size default), q_scale (multiplies q after RoPE: sharper rows), qk_std
# (q and k replaced by i.i.d. normal values of this std: logits ~ N(0, qk_std^4), flat rows).
REGIMES: Dict[str, dict] = {
    "tuned": dict(),
    "content": dict(head_cycle=("spatial", "local", "temporal")),  # position/content-matching heads only
    "sink": dict(head_cycle=("sink", "sink", "local", "sink", "global", "sink")),  # 2/3 sink heads
    "uniform": dict(qk_std=0.7),  # what random weights give: every row nearly flat
    "peaked": dict(head_cycle=("local",), q_scale=3.0),  # local heads, 3x the logit spread
    "text256": dict(n_text=256),  # joint attention, text after the video tokens (HunyuanVideo style)
    "text512": dict(n_text=512),
    "wan720": dict(grid=(21, 45, 80)),  # the default mix at Wan 720p: 75,600 tokens
}


@torch.no_grad()
def make_regime_qkv(regime: str, grid: Optional[Sequence[int]] = None, heads: int = 12, head_dim: int = 128,
                    seed: int = 0, device="cpu", dtype=torch.bfloat16, n_text: Optional[int] = None):
    """``make_video_qkv`` for one of ``REGIMES`` (grid and n_text default to the regime's own;
    small grids for CPU tests pass both).  ``info['grid']`` is the video grid, ``info['regime']``
    the name; for "uniform" v stays the realistic one (a flat row averages real values)."""
    r = REGIMES[regime]
    grid = tuple(grid if grid is not None else r.get("grid", (21, 30, 52)))
    n_text = r.get("n_text", 0) if n_text is None else int(n_text)
    cycle = r.get("head_cycle")
    types = None if cycle is None else [cycle[i % len(cycle)] for i in range(heads)]
    q, k, v, info = make_video_qkv(grid, heads, head_dim, n_text=n_text, seed=seed, device=device, dtype=dtype,
                                   head_types=types)
    if "q_scale" in r:
        q = (q.float() * r["q_scale"]).to(dtype)
    if "qk_std" in r:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
        q = (torch.randn(q.shape, generator=gen) * r["qk_std"]).to(device, dtype)
        k = (torch.randn(k.shape, generator=gen) * r["qk_std"]).to(device, dtype)
    info["regime"] = regime
    return q, k, v, info


def _main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(6, 16, 20))
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--n-text", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--sample", type=int, default=64)
    ap.add_argument("--radius", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":   # warm-up: CUDA context and kernels, not part of the timing
        make_video_qkv((2, 4, 4), 1, args.head_dim, n_text=args.n_text and 2, device=dev)
        sync()
    t0 = time.perf_counter()
    q, k, v, info = make_video_qkv(tuple(args.grid), args.heads, args.head_dim, n_text=args.n_text,
                                   seed=args.seed, device=dev)
    sync()
    t1 = time.perf_counter()
    st = attention_stats(q, k, args.block_q, args.block_k, args.sample, seed=args.seed, grid=info["grid"],
                         n_text=args.n_text, radius=args.radius, v=v)
    sync()
    t2 = time.perf_counter()
    print(f"grid {info['grid']} + {args.n_text} text = {q.shape[2]} tokens, {args.heads} heads, D {args.head_dim}, "
          f"raster order, blocks q{args.block_q}/k{args.block_k}, radius {args.radius}")
    print(f"q/k per-dim rms {q.float().pow(2).mean().sqrt().item():.3f}/{k.float().pow(2).mean().sqrt().item():.3f}, "
          f"sinks {info['sink_tokens']}")
    print(format_stats(st, info["head_types"]))
    print(f"generate {t1 - t0:.2f} s, stats {t2 - t1:.2f} s on {dev}")


if __name__ == "__main__":
    _main()
