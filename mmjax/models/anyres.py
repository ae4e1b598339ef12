"""LLaVA-NeXT's any-resolution layout, computed on the host from an image's size: the grid
("pinpoint") an image gets, the tower-sized views it is cut into, and how many feature tokens
it yields once the padding is taken off the feature grid and each feature row ends with a
newline. Everything here depends only on the image's size, so the jitted step sees fixed
shapes (a fixed number of view slots) and the token positions the pipeline computes.

Axis legend: H, W an image's height and width in pixels; T the tower's image side; P the
tower's patch side; n = T // P the features per view side; R, C the grid's rows and columns
of views; h, w the feature grid after unpadding.

The views, in the order the model encodes them: the base view (the whole image squashed to
T x T: neither padded nor cropped), then the grid's R x C tiles row by row, cut from the
image resized to fit the pinpoint (aspect kept, the scaled side rounded up) and centred on a
black canvas of the pinpoint's size (an odd leftover pixel goes to the bottom or right).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

Pinpoints = Sequence[Sequence[int]]  # [(height, width), ...] in pixels, multiples of T


def best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps most of the image's pixels when it is scaled to
    fit (the scaled size truncated to whole pixels), then wastes least; ties keep the first in
    list order."""
    best, most, waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - kept
        if kept > most or (kept == most and wasted < waste):
            best, most, waste = (int(ph), int(pw)), kept, wasted
    if best is None:
        raise ValueError("no pinpoints to choose from")
    return best


def fitted_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(height, width) of the image scaled to fit (target_h, target_w) with its aspect kept:
    the limiting side takes the target, the other `ceil(side * scale)` (at most the target)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def views(image: np.ndarray, pinpoints: Pinpoints, tile: int) -> tuple[np.ndarray, tuple]:
    """uint8 [H, W, 3] -> uint8 [1 + R*C, T, T, 3] (the base view, then the tiles row by row)
    and the grid (R, C)."""
    height, width = image.shape[:2]
    ph, pw = best_resolution(height, width, pinpoints)
    pil = Image.fromarray(image)
    base = np.asarray(pil.resize((tile, tile), Image.Resampling.BICUBIC))
    nh, nw = fitted_size(height, width, ph, pw)
    resized = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC))
    canvas = np.zeros((ph, pw, 3), np.uint8)
    top, left = (ph - nh) // 2, (pw - nw) // 2
    canvas[top:top + nh, left:left + nw] = resized
    rows, cols = ph // tile, pw // tile
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    return np.concatenate([base[None], tiles.reshape(rows * cols, tile, tile, 3)]), (rows, cols)


def unpadded_grid(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The feature grid (grid_h, grid_w) of a pinpoint without the rows or columns that only
    saw padding: the image's aspect decides which side shrinks, by `(g - new) // 2` at each
    end (an odd remainder keeps one more)."""
    if width / height > grid_w / grid_h:
        new = int(round(height * (grid_w / width), 7))
        return grid_h - 2 * ((grid_h - new) // 2), grid_w
    new = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - 2 * ((grid_w - new) // 2)


def feature_tokens(height: int, width: int, pinpoints: Pinpoints, tile: int, patch: int,
                   cls: bool = False, newline: bool = True) -> int:
    """The LLM tokens one image of (height, width) pixels takes in LLaVA-NeXT's
    `spatial_unpad` layout: the base view's n*n features (+1 with the CLS token), then the
    unpadded grid h*w with one newline per row."""
    n = tile // patch
    ph, pw = best_resolution(height, width, pinpoints)
    h, w = unpadded_grid(height, width, (ph // tile) * n, (pw // tile) * n)
    return n * n + int(cls) + h * w + (h if newline else 0)


def _unpadded_sources(height: int, width: int, pinpoints: Pinpoints, tile: int, patch: int
                      ) -> tuple[np.ndarray, int]:
    """int [h, w]: the unpadded feature grid as indices into the image's views' features
    laid end to end (view-major, each view's n x n row-major), and the newline's index."""
    n = tile // patch
    ph, pw = best_resolution(height, width, pinpoints)
    rows, cols = ph // tile, pw // tile
    h, w = unpadded_grid(height, width, rows * n, cols * n)
    top, left = (rows * n - h) // 2, (cols * n - w) // 2
    y = np.arange(top, top + h)[:, None]
    x = np.arange(left, left + w)[None, :]
    grid = (1 + (y // n) * cols + x // n) * n * n + (y % n) * n + x % n  # [h, w]
    return grid, (1 + rows * cols) * n * n


def feature_sources(height: int, width: int, pinpoints: Pinpoints, tile: int,
                    patch: int) -> np.ndarray:
    """int32 [tokens]: for each of an image's LLM tokens in the `spatial_unpad` layout, the
    feature it takes from the image's views' features laid end to end, [(1 + R*C) * n * n]
    (view-major, each view's n x n row-major), where the index (1 + R*C) * n * n is the
    learned newline. The model gathers with it: its step never depends on the image's size."""
    n = tile // patch
    grid, newline = _unpadded_sources(height, width, pinpoints, tile, patch)
    lines = np.concatenate([grid, np.full((grid.shape[0], 1), newline)], 1)
    return np.concatenate([np.arange(n * n), lines.ravel()]).astype(np.int32)


# ------------------------------------------------------------------------ LLaVA-OneVision
# OneVision pools what LLaVA-NeXT would gather: the unpadded grid of an image whose tiles hold
# more than `anyres_max` tiles' worth of features (by more than 10%), and every video frame
# 2 x 2. Pooling is bilinear interpolation (PyTorch's, align_corners=False), so each token is
# a weighted sum of up to 4 features: `taps` give their indices [tokens, 4] and weights
# [tokens, 4], still computed on the host from sizes alone.
TAPS = 4


def _bilinear(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear source indices (i0, i1) and weights of i1 for each output index
    along one axis, as its CPU kernel computes them for float32 features
    (align_corners=False): a float32 scale, the source index in double, rounded to float32."""
    out = np.arange(n_out)
    if n_in == n_out:
        return out, out, np.zeros(n_out, np.float32)
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    real = np.maximum(scale * (out + 0.5) - 0.5, 0.0).astype(np.float32)
    i0 = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    lam = np.clip(real - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, lam


def pooled(grid: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of `grid` (indices [h, w]) resized to [out_h, out_w]: int32 [out_h, out_w, 4]
    and float32 [out_h, out_w, 4]."""
    y0, y1, ly = _bilinear(grid.shape[0], out_h)
    x0, x1, lx = _bilinear(grid.shape[1], out_w)
    src = np.stack([grid[y0][:, x0], grid[y0][:, x1], grid[y1][:, x0], grid[y1][:, x1]], -1)
    wy, wx = (1 - ly)[:, None], (1 - lx)[None, :]
    weights = np.stack([wy * wx, wy * lx[None, :], ly[:, None] * wx,
                        ly[:, None] * lx[None, :]], -1).astype(np.float32)
    return src.astype(np.int32), weights


def _single(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Taps that take one feature each: [k] -> [k, 4] indices and weights (1, 0, 0, 0)."""
    index = np.asarray(index, np.int32)
    weights = np.zeros(index.shape + (TAPS,), np.float32)
    weights[..., 0] = 1
    return np.repeat(index[..., None], TAPS, -1), weights


def max_pooled_size(h: int, w: int, n: int, max_tiles: int) -> tuple[int, int]:
    """The unpadded grid's size after OneVision's `anyres_max_{max_tiles}` (n features per
    tile side): unchanged up to 1.1 x the budget, else scaled by the ratio (floored)."""
    ratio = math.sqrt(h * w / (max_tiles * n ** 2))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)


def feature_taps(height: int, width: int, pinpoints: Pinpoints, tile: int, patch: int,
                 max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """OneVision's single-image layout (`anyres_max_{max_tiles}`): taps [tokens, 4] and
    weights of the base view's n*n features, then the unpadded grid (pooled when it is over
    the budget) with a newline after each row; indices as `feature_sources`'."""
    n = tile // patch
    grid, newline = _unpadded_sources(height, width, pinpoints, tile, patch)
    out_h, out_w = max_pooled_size(*grid.shape, n, max_tiles)
    if (out_h, out_w) == grid.shape:
        src, wts = _single(grid)
    else:
        src, wts = pooled(grid, out_h, out_w)
    line_src, line_wts = _single(np.full((out_h, 1), newline))
    base_src, base_wts = _single(np.arange(n * n))
    return (np.concatenate([base_src, np.concatenate([src, line_src], 1).reshape(-1, TAPS)]),
            np.concatenate([base_wts, np.concatenate([wts, line_wts], 1).reshape(-1, TAPS)]))


def square_taps(n: int) -> tuple[np.ndarray, np.ndarray]:
    """OneVision's layout of an image among several (one square view, no tiles): its n*n
    features, then one newline (index n*n)."""
    return _single(np.arange(n * n + 1))


def video_taps(frames: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """OneVision's video layout: each frame's n x n features pooled to ceil(n/2) a side,
    frame after frame, then one newline (index frames*n*n)."""
    m = -(-n // 2)
    src, wts = pooled(np.arange(n * n).reshape(n, n), m, m)
    src = (src.reshape(1, -1, TAPS) + (np.arange(frames) * n * n)[:, None, None]
           ).reshape(-1, TAPS)
    wts = np.broadcast_to(wts.reshape(1, -1, TAPS), (frames, m * m, TAPS)).reshape(-1, TAPS)
    line_src, line_wts = _single(np.asarray([frames * n * n]))
    return np.concatenate([src, line_src]), np.concatenate([wts, line_wts])


def row_sources(sources: np.ndarray, views: int, slot: int, slots: int, max_views: int,
                view_tokens: int) -> np.ndarray:
    """An image's `feature_sources` (its `views` views' features, then its newline) as
    indices into the row's table the model gathers from: `slots` image slots of `max_views`
    views each, end to end, then the newline (mmjax.models.llava)."""
    newline = sources == views * view_tokens
    return place_sources(np.where(newline, -1, sources), slot, slots, max_views, view_tokens)


@dataclasses.dataclass(frozen=True)
class ImageViews:
    """One image as an any-resolution model takes it (`prepare`)."""

    pixels: np.ndarray  # uint8 [V, T, T, 3]: the base view, then the grid's tiles row by row
    # (OneVision: one square view for an image among several; a video's frames)
    sources: np.ndarray  # int32 [tokens]: `feature_sources` (OneVision: [tokens, 4] taps)
    size: tuple[int, int]  # (H, W) of the image in pixels
    weights: np.ndarray | None = None  # float32 [tokens, 4]: OneVision's taps' weights
    video: bool = False  # a video (its views are frames; its tokens stand at <video>)

    @property
    def tokens(self) -> int:
        """How many LLM tokens the image takes."""
        return len(self.sources)


def prepare(image: np.ndarray, pinpoints: Pinpoints, tile: int, patch: int) -> ImageViews:
    """uint8 [H, W, 3] -> its views and the sources of its LLM tokens."""
    height, width = image.shape[:2]
    pixels, _ = views(image, pinpoints, tile)
    return ImageViews(pixels, feature_sources(height, width, pinpoints, tile, patch),
                      (height, width))


def sample_sources(images: Sequence[ImageViews], max_views: int, view_tokens: int
                   ) -> np.ndarray:
    """int32 [tokens of all images] ([tokens, 4] taps): the sources of a sample's images, in
    order, as indices into the sample's own table (image k's views at k * max_views *
    view_tokens), -1 for a newline; `place_sources` moves them into a row."""
    out = []
    for k, im in enumerate(images):
        newline = im.sources == len(im.pixels) * view_tokens
        out.append(np.where(newline, -1, k * max_views * view_tokens + im.sources))
    return np.concatenate(out).astype(np.int32)


def place_sources(sources: np.ndarray, slot: int, slots: int, max_views: int,
                  view_tokens: int) -> np.ndarray:
    """`sample_sources` of a sample whose first image sits in image slot `slot` of a row of
    `slots` slots -> indices into that row's table (mmjax.models.llava)."""
    per_slot = max_views * view_tokens
    return np.where(sources < 0, slots * per_slot, slot * per_slot + sources).astype(np.int32)
