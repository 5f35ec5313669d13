"""Generalized 3D Hilbert ordering of video tokens.

Video tokens arrive in raster order over a (T, H, W) grid: index = (t*H + h)*W + w.
Sparse attention works on blocks of 64/128 consecutive tokens, and raster rows
(52, 60, 80 tokens wide) do not line up with blocks, so a raster block is a thin
sliver spanning far-apart pixels. Reordering tokens along a space-filling curve
makes every block a compact little box in space *and* time, which makes block
means representative and block-level sparsity much more effective.

The grids are arbitrary cuboids (21x30x52, 33x34x60, ...), so the curve is a
generalized Hilbert curve built by recursive subdivision (the idea behind
J. Cerveny's "gilbert"; this is an independent implementation):

* A box is walked from one corner to the corner next to it along the box's
  *major* axis a (local coords: start (0,0,0), end (A-1,0,0)).
* It is cut into 2, 3 or 5 sub-boxes, each walked with the same contract but
  rotated/mirrored so that each piece ends next to where the next one starts.
  Like a Hilbert curve, the longest sides are halved, keeping pieces cube-like.
* Odd sizes: by checkerboard colouring, a corner-to-corner walk with all unit
  steps can only exist if A is even or A, B, C are all odd ("feasible"). Split
  points are picked near the middle such that every piece is feasible again, and
  such a split always exists (A even >= 4: halve a into even parts; A == 2: fold
  into two 1-thick slabs; A odd: cut off an even-length part of a, or U-split
  with an even b1 / c1). A line is trivially feasible, so by induction every
  feasible box gets a walk with unit steps only. The whole grid is feasible once
  the major axis is an even side (or all sides are odd), so consecutive tokens
  are *always* grid neighbours, for every grid size.

Paths depend only on the box shape, so they are memoized per shape in local
coordinates and pieces are placed with a numpy affine map (signed axis
permutation + offset); a 67k-token grid builds in a few milliseconds.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "hilbert_order",
    "TokenPermutation",
    "mean_block_extent",
    "unit_step_fraction",
]

Grid = tuple[int, int, int]

# Unit vectors of a box's local frame (a = major axis, b, c = minor axes).
_EA, _EB, _EC = np.eye(3, dtype=np.int64)


def _feasible(a: int, b: int, c: int) -> bool:
    """Can an a x b x c box be walked corner -> a-neighbour corner in unit steps?"""
    if a == 1:
        return b == 1 and c == 1
    return a % 2 == 0 or (b % 2 == 1 and c % 2 == 1)  # a even, or all three odd


def _halves(n: int, lo: int = 1) -> list[int]:
    """Candidate sizes for the first part of a split of n, nearest to n/2 first."""
    cands = {n // 2 - 1, n // 2, (n + 1) // 2, (n + 1) // 2 + 1}
    return sorted((k for k in cands if lo <= k <= n - 1), key=lambda k: (abs(2 * k - n), k))


# A piece: (dims (major, minor1, minor2), 3x3 matrix whose rows are the piece's
# axes in the parent's frame, offset of the piece's start cell in the parent frame).
Piece = tuple[Grid, np.ndarray, tuple[int, int, int]]


def _split_major(A: int, B: int, C: int, a1: int) -> list[Piece]:
    """Two boxes one after the other along a (for boxes much longer than wide)."""
    M = np.stack([_EA, _EB, _EC])
    return [((a1, B, C), M, (0, 0, 0)), ((A - a1, B, C), M, (a1, 0, 0))]


def _split_u(A: int, B: int, C: int, a1: int, b1: int) -> list[Piece]:
    """2D Hilbert 'U' in the a-b plane, c kept whole:

        up b through [0,a1)x[0,b1), across a through [0,A)x[b1,B),
        down b through [a1,A)x[0,b1).
    With b1 == B (no middle piece) this is a fold, valid only for A == 2.
    """
    pieces = [((b1, a1, C), np.stack([_EB, _EA, _EC]), (0, 0, 0))]
    if b1 < B:
        pieces.append(((A, B - b1, C), np.stack([_EA, _EB, _EC]), (0, b1, 0)))
    pieces.append(((b1, A - a1, C), np.stack([-_EB, -_EA, _EC]), (A - 1, b1 - 1, 0)))
    return pieces


def _split_octants(A: int, B: int, C: int, a1: int, b1: int, c1: int) -> list[Piece]:
    """3D Hilbert step: the 8 octants visited in Gray-code order
    000 -> 01x -> x01 -> 11x -> 100 (bits = high half of a, b, c), grouped into 5 boxes."""
    a2, b2, c2 = A - a1, B - b1, C - c1
    return [
        ((b1, a1, c1), np.stack([_EB, _EA, _EC]), (0, 0, 0)),
        ((C, a1, b2), np.stack([_EC, _EA, _EB]), (0, b1, 0)),
        ((A, b1, c2), np.stack([_EA, -_EB, -_EC]), (0, b1 - 1, C - 1)),
        ((C, a2, b2), np.stack([-_EC, -_EA, _EB]), (A - 1, b1, C - 1)),
        ((b1, a2, c1), np.stack([-_EB, -_EA, _EC]), (A - 1, b1 - 1, 0)),
    ]


def _candidates(A: int, B: int, C: int, kind: str):
    """All decompositions of one kind ('major', 'u', 'oct') with splits near the middle."""
    if kind == "major" and A >= 2:
        for a1 in _halves(A):
            yield _split_major(A, B, C, a1)
    elif kind == "u" and A >= 2 and B >= 2:
        for b1 in _halves(B) + ([B] if A == 2 else []):
            for a1 in _halves(A):
                yield _split_u(A, B, C, a1, b1)
    elif kind == "oct" and min(A, B, C) >= 2:
        for b1 in _halves(B):
            for c1 in _halves(C):
                for a1 in _halves(A):
                    yield _split_octants(A, B, C, a1, b1, c1)


def _swap_bc(pieces: list[Piece]) -> list[Piece]:
    """Map pieces built for an (A, C, B) box back into the (A, B, C) frame."""
    return [(d, M[:, [0, 2, 1]], (o[0], o[2], o[1])) for d, M, o in pieces]


def _choose(A: int, B: int, C: int) -> list[Piece]:
    # Preference like a Hilbert curve: halve whatever is long relative to the rest.
    if 2 * A > 3 * max(B, C):
        prefs = ["major", "u", "u'", "oct", "oct'"]
    elif 3 * B > 4 * C:
        prefs = ["u", "oct", "oct'", "u'", "major"]
    elif 3 * C > 4 * B:
        prefs = ["u'", "oct'", "oct", "u", "major"]
    else:
        prefs = ["oct", "oct'", "u", "u'", "major"]
    for kind in prefs:
        swapped = kind.endswith("'")
        dims = (A, C, B) if swapped else (A, B, C)
        for pieces in _candidates(*dims, kind.rstrip("'")):
            pieces = _swap_bc(pieces) if swapped else pieces
            if all(_feasible(*d) for d, _, _ in pieces):
                return pieces
    # Unreachable for feasible boxes (see module docstring).
    raise AssertionError(f"no feasible split of box {(A, B, C)}")


@functools.lru_cache(maxsize=4096)  # ~100 shapes per grid, a few MB in all
def _box_path(A: int, B: int, C: int) -> np.ndarray:
    """(A*B*C, 3) local coords of the walk through an A x B x C box, start (0,0,0)."""
    if B == 1 and C == 1:  # a straight line along a
        out = np.zeros((A, 3), dtype=np.int64)
        out[:, 0] = np.arange(A)
    else:
        parts = [_box_path(*d) @ M + np.asarray(o) for d, M, o in _choose(A, B, C)]
        out = np.concatenate(parts)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _grid_order(t: int, h: int, w: int) -> torch.Tensor:
    dims = (t, h, w)
    # Major axis: the longest one that allows an all-unit-step walk (an even one,
    # or any if all are odd); the other two keep their grid order.
    major = max(range(3), key=lambda i: (dims[i] % 2 == 0 or all(d % 2 for d in dims), dims[i]))
    minors = [i for i in range(3) if i != major]
    local = _box_path(dims[major], dims[minors[0]], dims[minors[1]])
    coords = np.empty_like(local)
    coords[:, [major] + minors] = local
    raster = (coords[:, 0] * h + coords[:, 1]) * w + coords[:, 2]
    return torch.from_numpy(np.ascontiguousarray(raster))


def _check_grid(grid) -> Grid:
    try:
        t, h, w = (operator.index(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be three integers (t, h, w), got {grid!r}") from None
    if min(t, h, w) < 1:
        raise ValueError(f"grid dims must all be >= 1, got (t, h, w) = {(t, h, w)}")
    return t, h, w


def hilbert_order(t: int, h: int, w: int) -> torch.Tensor:
    """perm[i] = raster index ((t*H + h)*W + w) of the i-th cell along the curve.

    Cached per grid; a fresh CPU LongTensor copy is returned so callers may modify it.
    """
    return _grid_order(*_check_grid((t, h, w))).clone()


@dataclass(frozen=True, eq=False)
class TokenPermutation:
    """Reorders a token dimension: grid tokens along the Hilbert curve, any tail
    tokens (e.g. text tokens of joint attention) left in place after them."""

    grid: Grid
    n_tokens: int
    perm: torch.Tensor  # perm[i] = original index of the i-th reordered token
    inv: torch.Tensor  # inv[perm[i]] = i
    perm32: torch.Tensor  # perm as int32, for kernels that gather rows while they quantize

    @classmethod
    def for_grid(
        cls, grid: Grid, n_tokens: Optional[int] = None, device: Union[str, torch.device, None] = None
    ) -> "TokenPermutation":
        grid = _check_grid(grid)
        n_grid = grid[0] * grid[1] * grid[2]
        n_tokens = n_grid if n_tokens is None else int(n_tokens)
        if n_tokens < n_grid:
            raise ValueError(
                f"n_tokens={n_tokens} is smaller than the grid {grid} ({n_grid} tokens); "
                "grid tokens must come first, followed by any extra tokens"
            )
        return _cached_permutation(grid, n_tokens, torch.device(device or "cpu"))

    def _index(self, idx: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] != self.n_tokens:
            raise ValueError(f"dim {dim} of x has {x.shape[dim]} tokens, permutation expects {self.n_tokens}")
        if idx.device != x.device:  # prefer for_grid(..., device=x.device) to avoid this copy
            idx = idx.to(x.device)
        return x.index_select(dim, idx)

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Raster order -> curve order along `dim`."""
        return self._index(self.perm, x, dim)

    def invert(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Curve order -> raster order along `dim` (exact inverse of `apply`)."""
        return self._index(self.inv, x, dim)


@functools.lru_cache(maxsize=256)
def _cached_permutation(grid: Grid, n_tokens: int, device: torch.device) -> TokenPermutation:
    if device.type != "cpu":  # build on CPU once, then copy
        cpu = _cached_permutation(grid, n_tokens, torch.device("cpu"))
        return TokenPermutation(grid, n_tokens, cpu.perm.to(device), cpu.inv.to(device), cpu.perm32.to(device))
    grid_perm = _grid_order(*grid)
    n_grid = grid_perm.numel()
    perm = torch.cat([grid_perm, torch.arange(n_grid, n_tokens, dtype=torch.long)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n_tokens, dtype=torch.long)
    return TokenPermutation(grid, n_tokens, perm, inv, perm.to(torch.int32))



@functools.lru_cache(maxsize=64)
def grid_permutations(grid: Optional[Grid], n: int, nk: int, device: torch.device):
    """(the queries' TokenPermutation, the keys') for a grid, (None, None) without one: the keys' is
    another one when a tail of text tokens makes them differ in length. Cached: asked every call."""
    if grid is None:
        return None, None
    perm = TokenPermutation.for_grid(grid, n, device=device)
    return perm, (perm if nk == n else TokenPermutation.for_grid(grid, nk, device=device))

def _coords(t: int, h: int, w: int, order: torch.Tensor) -> torch.Tensor:
    t, h, w = _check_grid((t, h, w))
    order = torch.as_tensor(order).long().cpu()
    if order.shape != (t * h * w,):
        raise ValueError(f"order must have shape ({t * h * w},), got {tuple(order.shape)}")
    return torch.stack([order // (h * w), (order // w) % h, order % w], dim=1).double()


def mean_block_extent(t: int, h: int, w: int, order: torch.Tensor, block: int = 64) -> float:
    """Locality of an ordering: mean Euclidean grid distance of a token to the
    centroid of its block (`block` consecutive tokens in `order`), averaged per
    block, then over blocks (a shorter last block counts as one block).
    Lower is more compact; a solid 4x4x4 cube scores ~1.87."""
    xyz = _coords(t, h, w, order)
    n = xyz.shape[0]
    blk = torch.arange(n) // block
    nb = int(blk[-1]) + 1
    counts = torch.bincount(blk, minlength=nb).double()
    centroid = torch.zeros(nb, 3, dtype=torch.float64).index_add_(0, blk, xyz) / counts[:, None]
    dist = (xyz - centroid[blk]).norm(dim=1)
    per_block = torch.zeros(nb, dtype=torch.float64).index_add_(0, blk, dist) / counts
    return float(per_block.mean())


def unit_step_fraction(t: int, h: int, w: int, order: torch.Tensor) -> float:
    """Fraction of consecutive cells in `order` that are grid neighbours (distance 1)."""
    xyz = _coords(t, h, w, order)
    if xyz.shape[0] < 2:
        return 1.0
    steps = (xyz[1:] - xyz[:-1]).abs().sum(dim=1)
    return float((steps == 1).double().mean())
