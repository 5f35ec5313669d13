"""The method's numbers, helpers and step 0 in plain PyTorch: the constants the kernels share,
block splitting, int8 per-block quantization, K's smoothing vector, V's fp8 scale and P's
rounding.

Part of the reference (reference.py is the whole method): it models the kernels' arithmetic
exactly (the same rounding, the same samples), written for clarity, not speed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blockmask import num_blocks

LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8_e4m3fn
P_SCALE_FP8 = 256.0  # P in [0,1] is stored as fp8(P*256): keeps small probabilities out of fp8 subnormals
TINY = 1e-20


# ----------------------------------------------------------------------------- helpers
def split_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, nb, block, D), zero padded at the end."""
    n = x.shape[2]
    nb = num_blocks(n, block)
    x = F.pad(x, (0, 0, 0, nb * block - n))
    return x.unflatten(2, (nb, block))


def block_token_counts(n: int, block: int, device=None) -> torch.Tensor:
    nb = num_blocks(n, block)
    starts = torch.arange(nb, device=device) * block
    return torch.clamp(n - starts, max=block).float()


def int8_values(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x in int8 steps of amax / 127 (as floats): x * s with s = 127 / amax (fp32, divided
    exactly; 127.0 / amax would multiply by amax's rounded reciprocal), the exact product rounded
    once to the nearest integer, ties to even, which the kernels do in one FFMA
    (kernels.numerics.round_to_i32).

    Rounding the fp32 product gives the same integer unless that product is a half-integer: below
    2^22 half-integers lie on fp32's grid, so an exact product that is not one stays on the same
    side of it. There (rarely) the exact product decides, in float64, where the product of two
    fp32 values is exact; the rest stays in fp32, with no float64 copy of x."""
    s = torch.full_like(amax, 127.0) / amax
    p = x * s
    r = torch.round(p)
    tie = (p - torch.floor(p)) == 0.5
    if tie.any():
        r[tie] = torch.round(x.expand_as(p)[tie].double() * s.expand_as(p)[tie].double()).float()
    return r.clamp(-127, 127)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: repeat each key/value head for the query heads that share it."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


# ----------------------------------------------------------------------------- step 0
# K's smoothing vector is the mean of a fixed sample of the keys: runs of KMEAN_SAMPLE[0] tokens,
# one run in every KMEAN_SAMPLE[1] (1/8 of the keys). Any vector subtracted from every key leaves
# the softmax exact; the mean only centres the int8 range, which a sample does as well, and the
# stats pass (kernels/kv_stats.py) then reads 1/8 of K instead of all of it.
KMEAN_SAMPLE = (32, 8)


def sampled_rows(n: int, device=None) -> torch.Tensor:
    """The rows of the stats sample (KMEAN_SAMPLE; token 0 onwards, so every sequence has at least
    one sampled row), as a boolean (n,) mask."""
    rows, every = KMEAN_SAMPLE
    return (torch.arange(n, device=device) // rows) % every == 0


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """K's smoothing vector (B,H,1,D): the mean of the sampled keys (sampled_rows)."""
    return k[:, :, sampled_rows(k.shape[2], k.device)].mean(dim=2, keepdim=True)


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """Subtract K's smoothing vector (key_mean): every score of a query row shifts by the same
    amount, so the softmax is unchanged, but the int8 range is spent on what differs between keys."""
    return k - key_mean(k)


def quantize_int8_per_block(x: torch.Tensor, block: int):
    """int8 with one scale per block of tokens. Returns (values as int8 (B,H,N,D), scale (B,H,nb))."""
    n = x.shape[2]
    xb = split_blocks(x.float(), block)
    amax = xb.abs().amax(dim=(-1, -2)).clamp_min(TINY)
    xq = int8_values(xb, amax[..., None, None])
    return xq.flatten(2, 3)[:, :, :n].to(torch.int8), amax / 127.0


# V's per-channel scale comes from the same sample of rows as K's smoothing vector, with room for
# values up to V_HEADROOM times the sample's largest: the stats pass then reads 1/8 of V instead of
# all of it. fp8 e4m3's precision is relative (3 mantissa bits from 2^-6 to 448), so the unused top
# two binades cost nothing measurable; a head where some value would still land above the format's
# largest is quantized again with its exact maximum (the kernels check every block).
V_HEADROOM = 4.0


def value_scale(v: torch.Tensor) -> torch.Tensor:
    """V's per-channel scale (B,H,D) over all tokens: the sampled rows' max |v| times V_HEADROOM
    over FP8_MAX; a head where |v| / scale exceeds FP8_MAX anywhere gets max |v| / FP8_MAX over
    every row instead (its exact scale). Floored at TINY. The same rule for fp16 P.V, where
    nothing would overflow, so that both paths quantize alike."""
    v = v.float().abs()
    amax = v.amax(dim=2)
    sampled = (v[:, :, sampled_rows(v.shape[2], v.device)].amax(dim=2) * V_HEADROOM / FP8_MAX).clamp_min(TINY)
    over = (amax / sampled > FP8_MAX).any(dim=-1, keepdim=True)  # per (b, h)
    return torch.where(over, (amax / FP8_MAX).clamp_min(TINY), sampled)


def value_reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, rounded once (IEEE division). V is quantized as v * (1 / scale), one
    correctly rounded multiply, rather than v / scale: a GPU's `/` is an approximate division
    (up to 2 ulp), and where the scale is exact (max |v| / FP8_MAX) many quotients are exact
    ties of fp8, which an ulp decides; the product is the same on every device. It differs
    from the exact quotient by at most an ulp of fp32, far below an fp8 step."""
    return 1.0 / scale


def quantize_v(v: torch.Tensor, pv_dtype: str):
    """V with one scale per channel over all tokens (value_scale), times its reciprocal
    (value_reciprocal). Returns (fp32 values as the kernel sees them, scale (B,H,D))."""
    v = v.float()
    scale = value_scale(v)
    vs = v * value_reciprocal(scale)[:, :, None, :]
    if pv_dtype == "fp8":
        vs = vs.to(torch.float8_e4m3fn).float()
    elif pv_dtype == "fp16":
        vs = vs.half().float()
    elif pv_dtype != "fp32":
        raise ValueError(f"unknown pv_dtype {pv_dtype!r}")
    return vs, scale


def round_p(p: torch.Tensor, pv_dtype: str) -> torch.Tensor:
    if pv_dtype == "fp8":
        return (p * P_SCALE_FP8).to(torch.float8_e4m3fn).float() / P_SCALE_FP8
    if pv_dtype == "fp16":
        return p.half().float()
    return p
