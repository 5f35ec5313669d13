"""Pictures for the Sparge Sparsity Map node (pillow + numpy; no ComfyUI imports, so the
renderer is unit-tested on its own).

Two views of what a Sparge Attention node captured in its last sampling run
(`SpargeOverride.last_map`, nodes/capture.py `finish_map`; nodes/sparsity_views.py picks what to draw):

* block mask: the predicted block mask of one transformer block at one step. Rows are query
  blocks, columns key blocks, in the order the kernel visits tokens (3D Hilbert order when the
  node used it). One head: kept blocks amber, skipped blocks slate. Mean over heads: the share of
  heads that keep each block, from slate (no head) to amber (every head).
* layer x step: the sparsity (share of blocks skipped) of every transformer block (rows) at
  every step (columns); grey hatched cells ran normal (dense) attention.

Every block becomes a square of whole pixels (nearest neighbour), with a title and a legend.
Images are (1, H, W, 3) float32 tensors in [0, 1] (ComfyUI's IMAGE).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BG = (24, 27, 35)
PANEL = (34, 38, 49)
TEXT = (236, 238, 243)
DIM = (160, 167, 182)
KEPT = (255, 183, 77)  # computed block
SKIPPED = (46, 56, 84)  # skipped block
DENSE = (84, 86, 94)  # layer x step: the block ran normal attention
HIGHLIGHT = (255, 255, 255)
# own gradients (anchor colours, linearly interpolated)
MASK_RAMP = (SKIPPED, (112, 64, 138), (214, 96, 92), KEPT)
SPARSITY_RAMP = ((30, 42, 64), (31, 104, 128), (76, 182, 146), (214, 240, 150))

MAX_PLOT = 1280  # longest side of the plot in pixels before blocks are averaged together
TARGET_PLOT = 640  # cells grow until the plot's longest side reaches this
MIN_WIDTH = 600

_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF",
              "/Library/Fonts", "C:/Windows/Fonts")
_fonts: dict = {}


def font(size: int, bold: bool = False):
    key = (size, bold)
    if key in _fonts:
        return _fonts[key]
    names = ("DejaVuSans-Bold.ttf", "arialbd.ttf") if bold else ("DejaVuSans.ttf", "arial.ttf")
    f = None
    for name in names:
        for d in _FONT_DIRS:
            path = os.path.join(d, name)
            if os.path.exists(path):
                try:
                    f = ImageFont.truetype(path, size)
                    break
                except OSError:
                    pass
        if f is None:
            try:
                f = ImageFont.truetype(name, size)
            except OSError:
                pass
        if f is not None:
            break
    if f is None:
        try:
            f = ImageFont.load_default(size=size)  # Pillow >= 10.1
        except TypeError:  # pragma: no cover - old Pillow
            f = ImageFont.load_default()
    _fonts[key] = f
    return f


def _text_w(draw: ImageDraw.ImageDraw, text: str, f) -> int:
    box = draw.textbbox((0, 0), text, font=f)
    return box[2] - box[0]


def ramp(values: np.ndarray, anchors) -> np.ndarray:
    """values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)) along the anchor colours."""
    v = np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0.0, 1.0)
    a = np.asarray(anchors, dtype=np.float64)
    pos = v * (len(a) - 1)
    i = np.minimum(pos.astype(np.int64), len(a) - 2)
    t = (pos - i)[..., None]
    return np.round(a[i] * (1 - t) + a[i + 1] * t).astype(np.uint8)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ComfyUI IMAGE (1, H, W, 3) float32 in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def _cells(rgb: np.ndarray, cw: int, ch: int, gap: int) -> np.ndarray:
    """(R, C, 3) colours -> (R*ch, C*cw, 3) pixels, each cell a cw x ch block (nearest neighbour)
    with `gap` background pixels on its right and bottom edge."""
    big = np.repeat(np.repeat(rgb, ch, axis=0), cw, axis=1)
    if gap:
        rows = (np.arange(big.shape[0]) % ch) >= ch - gap
        cols = (np.arange(big.shape[1]) % cw) >= cw - gap
        big[rows, :, :] = PANEL
        big[:, cols, :] = PANEL
    return big


def _pool(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f tiles (the last tile may be partial)."""
    if f <= 1:
        return a
    r, c = a.shape
    pr, pc = (-r) % f, (-c) % f
    s = np.pad(a.astype(np.float64), ((0, pr), (0, pc)))
    n = np.pad(np.ones_like(a, dtype=np.float64), ((0, pr), (0, pc)))
    s = s.reshape(s.shape[0] // f, f, s.shape[1] // f, f).sum((1, 3))
    n = n.reshape(n.shape[0] // f, f, n.shape[1] // f, f).sum((1, 3))
    return s / np.maximum(n, 1)


_PROBE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def wrap(text: str, f, width: int) -> list:
    """Greedy word wrap to a pixel width."""
    out = []
    for para in text.split("\n"):
        cur = ""
        for w in para.split(" "):
            nxt = (cur + " " + w).strip()
            if cur and _text_w(_PROBE, nxt, f) > width:
                out.append(cur)
                cur = w
            else:
                cur = nxt
        out.append(cur)
    return out


class _Canvas:
    """A title / subtitle / legend header over a plot, on a dark background."""

    PAD = 16

    def __init__(self, plot_w: int, plot_h: int, title: str, sub: str = "", left: int = 0, top: int = 0,
                 bottom: int = 0, right: int = 0):
        width = max(MIN_WIDTH, 2 * self.PAD + left + plot_w + right,
                    min(900, 2 * self.PAD + _text_w(_PROBE, title, font(18, bold=True))))
        sub_lines = wrap(sub, font(13), width - 2 * self.PAD) if sub else []
        self.legend_y = 38 + 18 * len(sub_lines)
        header = self.legend_y + 28
        self.left, self.top = self.PAD + left, header + top
        self.left += (width - (2 * self.PAD + left + plot_w + right)) // 2  # centre the plot
        height = self.top + plot_h + bottom + self.PAD
        self.img = Image.new("RGB", (width, height), BG)
        self.draw = ImageDraw.Draw(self.img)
        self.plot_w, self.plot_h = plot_w, plot_h
        self.draw.text((self.PAD, 10), title, fill=TEXT, font=font(18, bold=True))
        for i, line in enumerate(sub_lines):
            self.draw.text((self.PAD, 36 + 18 * i), line, fill=DIM, font=font(13))

    def legend(self, items) -> None:
        y = self.legend_y
        """items: ("swatch", colour, label) or ("ramp", anchors, left label, right label)."""
        x = self.PAD
        f = font(13)
        for it in items:
            if it[0] == "swatch":
                self.draw.rectangle([x, y + 2, x + 13, y + 15], fill=it[1], outline=DIM if it[1] == BG else None)
                x += 19
                self.draw.text((x, y), it[2], fill=TEXT, font=f)
                x += _text_w(self.draw, it[2], f) + 18
            else:
                self.draw.text((x, y), it[2], fill=TEXT, font=f)
                x += _text_w(self.draw, it[2], f) + 6
                bar = ramp(np.linspace(0, 1, 120)[None, :].repeat(12, 0), it[1])
                self.img.paste(Image.fromarray(bar), (x, y + 3))
                x += 126
                self.draw.text((x, y), it[3], fill=TEXT, font=f)
                x += _text_w(self.draw, it[3], f) + 18

    def plot(self, pixels: np.ndarray) -> None:
        self.img.paste(Image.fromarray(pixels), (self.left, self.top))
        self.draw.rectangle([self.left - 1, self.top - 1, self.left + self.plot_w, self.top + self.plot_h], outline=DIM)


def render_block_mask(values: np.ndarray, *, title: str, subtitle: str = "", mean: bool = False,
                      block_q: int = 64, block_k: int = 128) -> Image.Image:
    """values: (NQ, NK); one head: bool / 0-1 (kept = 1); mean: the share of heads keeping each block."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"block mask must be a non-empty 2-D array, got shape {v.shape}")
    nq, nk = v.shape
    f = max(1, math.ceil(max(nq, nk) / MAX_PLOT))
    pooled = _pool(v, f)
    if f > 1:
        mean = True  # pooled tiles are shares
    r, c = pooled.shape
    cell = max(1, min(40, TARGET_PLOT // max(r, c)))
    gap = 1 if cell >= 6 else 0
    rgb = ramp(pooled, MASK_RAMP) if mean else np.where(pooled[..., None] >= 0.5, KEPT, SKIPPED).astype(np.uint8)
    pixels = _cells(rgb, cell, cell, gap)
    cv = _Canvas(pixels.shape[1], pixels.shape[0], title, subtitle, top=22)
    if mean:
        cv.legend([("ramp", MASK_RAMP, "heads keeping a block: none", "all")])
    else:
        cv.legend([("swatch", KEPT, "kept (computed)"), ("swatch", SKIPPED, "skipped")])
    cv.plot(pixels)
    scale = f" (1 px = {f}x{f} blocks)" if f > 1 else ""
    cv.draw.text((cv.PAD, cv.top - 19), f"rows: query blocks \u2193   columns: key blocks \u2192{scale}", fill=DIM,
                 font=font(12))
    cv.img.info["sparge_plot"] = {"left": cv.left, "top": cv.top, "cell_w": cell, "cell_h": cell, "gap": gap,
                                  "rows": r, "cols": c, "pool": f}
    return cv.img


def render_layer_step(rows: Sequence[Sequence[Optional[float]]], steps: Sequence, *, title: str, subtitle: str = "",
                      highlight_layer: Optional[int] = None) -> Image.Image:
    """rows[step][block] = sparsity in [0, 1] or None (dense). Drawn with blocks as rows, steps as columns."""
    n_steps = len(rows)
    n_layers = max((len(r) for r in rows), default=0)
    if n_steps == 0 or n_layers == 0:
        raise ValueError("nothing to draw: no step or no transformer block")
    grid = np.full((n_layers, n_steps), np.nan)
    for s, row in enumerate(rows):
        for b, val in enumerate(row):
            if val is not None:
                grid[b, s] = float(val)
    cw = max(4, min(64, 720 // n_steps))
    ch = max(4, min(36, 480 // n_layers))
    gap = 1 if min(cw, ch) >= 6 else 0
    rgb = ramp(grid, SPARSITY_RAMP)
    dense = np.isnan(grid)
    rgb[dense] = DENSE
    pixels = _cells(rgb, cw, ch, gap)
    # hatch the dense cells
    if dense.any():
        yy, xx = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
        dmask = np.repeat(np.repeat(dense, ch, 0), cw, 1) & (((xx + yy) % 6) == 0)
        pixels[dmask] = (120, 122, 130)
    fs = font(12)
    left = 64
    cv = _Canvas(pixels.shape[1], pixels.shape[0], title, subtitle, left=left, top=22, bottom=22, right=56)
    cv.legend([("ramp", SPARSITY_RAMP, "sparsity 0%", "100%"), ("swatch", DENSE, "normal attention")])
    cv.plot(pixels)
    d = cv.draw
    # cell values when there is room for them
    if cw >= 36 and ch >= 16:
        fv = font(11 if ch < 22 else 12)
        for b in range(n_layers):
            for s in range(n_steps):
                val = grid[b, s]
                txt = "dense" if np.isnan(val) else f"{100 * val:.0f}%"
                bright = not np.isnan(val) and val > 0.55
                tw = _text_w(d, txt, fv)
                d.text((cv.left + s * cw + (cw - gap - tw) // 2, cv.top + b * ch + (ch - gap - 13) // 2), txt,
                       fill=(20, 24, 32) if bright else TEXT, font=fv)
    # block labels (rows)
    every = max(1, math.ceil(16 / ch))
    for b in range(0, n_layers, every):
        txt = str(b)
        d.text((cv.left - 8 - _text_w(d, txt, fs), cv.top + b * ch + (ch - gap - 12) // 2), txt, fill=DIM, font=fs)
    d.text((cv.left - left + 2, cv.top - 18), "block \u2193", fill=DIM, font=fs)
    # step labels (columns)
    every = max(1, math.ceil(26 / cw))
    for s in range(0, n_steps, every):
        txt = "-" if steps[s] is None else str(steps[s])
        d.text((cv.left + s * cw + (cw - gap - _text_w(d, txt, fs)) // 2, cv.top + pixels.shape[0] + 5), txt,
               fill=DIM, font=fs)
    d.text((cv.left, cv.top - 18), "step \u2192", fill=DIM, font=fs)
    if highlight_layer is not None and 0 <= highlight_layer < n_layers:
        y0 = cv.top + highlight_layer * ch
        d.rectangle([cv.left - 2, y0 - 2, cv.left + pixels.shape[1] + 1, y0 + ch - gap + 1], outline=HIGHLIGHT, width=2)
        d.text((cv.left + pixels.shape[1] + 8, y0 + (ch - gap - 12) // 2), "\u25c0 map", fill=TEXT, font=fs)
    cv.img.info["sparge_plot"] = {"left": cv.left, "top": cv.top, "cell_w": cw, "cell_h": ch, "gap": gap,
                                  "rows": n_layers, "cols": n_steps}
    return cv.img


def render_message(title: str, lines: Sequence[str] = ()) -> Image.Image:
    """A small card with a title and wrapped lines (when there is nothing to draw)."""
    f = font(14)
    width = 640
    wrapped = [w for line in lines for w in wrap(line, f, width - 32)]
    img = Image.new("RGB", (width, 56 + 20 * len(wrapped) + 12), BG)
    d = ImageDraw.Draw(img)
    d.text((16, 14), title, fill=KEPT, font=font(18, bold=True))
    for i, line in enumerate(wrapped):
        d.text((16, 48 + 20 * i), line, fill=TEXT, font=f)
    return img


__all__ = ["render_block_mask", "render_layer_step", "render_message", "to_tensor", "ramp", "KEPT", "SKIPPED", "DENSE"]
