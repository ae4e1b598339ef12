"""Images for the vision towers: safe loading, LLaVA-1.5's `pad`, resize, normalise.

Axis legend: Y height, X width, C channels (RGB).

The pipeline ships uint8 [S, S, 3] images and normalises on the device (`normalize`), which
`mmjax.benchmarks.data_pipeline` measured faster than normalising on the host (a quarter of
the bytes through the workers' queues and host-to-device copies).
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mmjax.batch import normalize

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb limit (about 8000 x 8000)
# how an image is brought to the tower's square: pad (LLaVA-1.5: onto a square of the mean
# colour, then resize), resize (squash), crop (resize the short side, centre crop); anyres:
# LLaVA-NeXT's base view and grid tiles (mmjax.models.anyres), for models with pinpoints
ImageAspect = Literal["pad", "resize", "crop", "anyres"]


class ImageError(Exception):
    """An image that cannot be used; `reason` is one of mmjax.data.quality.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def check_relative(relative) -> str:
    """An image path relative to its root, refused when it is not a path or could leave the
    root ('..', absolute)."""
    if not isinstance(relative, str) or not relative:
        raise ImageError("malformed_record", f"image path {relative!r}")
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise ImageError("unsafe_image_path", relative)
    return relative


def resolve_image_path(root: str | os.PathLike, relative: str) -> Path:
    """`root / relative`, refusing paths that escape the root ('..', absolute, symlinks)."""
    check_relative(relative)
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, relative))
    if os.path.commonpath([root_real, path]) != root_real:
        raise ImageError("unsafe_image_path", f"{relative} resolves outside the image root")
    if not os.path.isfile(path):
        raise ImageError("missing_image", relative)
    return Path(path)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, or ImageError (empty, too large, corrupt or truncated)."""
    if not data:
        raise ImageError("empty_image", "0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w == 0 or h == 0:
            raise ImageError("empty_image", f"{w}x{h}")
        if w * h > max_pixels:
            raise ImageError("image_too_large", f"{w}x{h} > {max_pixels} pixels")
        image.load()  # decodes now: a truncated file fails here, not later
        return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", str(e)) from None
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "data", str(e))
        raise ImageError("corrupt_image", f"{type(e).__name__}: {detail}") from None


def expand_to_square(image: Image.Image, fill: tuple[float, float, float]) -> Image.Image:
    """LLaVA-1.5 `pad`: centre the image on a square filled with the tower's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    colour = tuple(int(255 * c) for c in fill)
    out = Image.new("RGB", (side, side), colour)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _pad_and_resize(image: Image.Image, size: int, fill) -> Image.Image:
    """`expand_to_square(image, fill).resize((size, size), BICUBIC)`, bit for bit, with less
    work for landscape images.

    PIL resamples in two passes, horizontal then vertical, through a uint8 image. For a
    landscape image the padding is rows above and below, whose horizontal pass is the fill
    colour exactly, so the horizontal pass runs on the image alone (3/4 of the rows for 4:3)
    and only its output is padded before the vertical pass. Portrait images pad columns,
    which the horizontal pass reads, so they take the plain path.
    """
    w, h = image.size
    if w <= h:
        return expand_to_square(image, fill).resize((size, size), Image.BICUBIC)
    rows = image.resize((size, h), Image.BICUBIC)  # the horizontal pass only
    canvas = Image.new("RGB", (size, w), tuple(int(255 * c) for c in fill))
    canvas.paste(rows, (0, (w - h) // 2))
    return canvas.resize((size, size), Image.BICUBIC)  # the vertical pass only


def resize_uint8(image: Image.Image, size: int, mean, aspect: str = "pad") -> np.ndarray:
    """RGB image -> uint8 [size, size, 3].

    aspect: 'pad' (LLaVA-1.5: square with the mean colour, then resize), 'resize' (squash),
    or 'crop' (resize the short side, centre crop).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if aspect == "pad":
        image = _pad_and_resize(image, size, mean)
    elif aspect == "resize":
        image = image.resize((size, size), Image.BICUBIC)
    elif aspect == "crop":
        # CLIPImageProcessor's arithmetic: the long side is int(size * long / short)
        w, h = image.size
        short, long = min(w, h), max(w, h)
        other = int(size * long / short)
        image = image.resize((size, other) if w <= h else (other, size), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif aspect == "anyres":
        raise ValueError("aspect 'anyres' makes several views per image "
                         "(mmjax.models.anyres.prepare), not one square")
    else:
        raise ValueError(f"unknown aspect mode {aspect!r}: pad, resize or crop")
    return np.asarray(image, np.uint8)


def load_rgb(image: str | os.PathLike | bytes | Image.Image | np.ndarray,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A file, encoded bytes, a PIL image or a uint8 array -> an RGB PIL image; ImageError
    when the image cannot be used."""
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    if isinstance(image, bytes):
        return decode_image(image, max_pixels)
    if isinstance(image, np.ndarray):
        if image.size == 0:
            raise ImageError("empty_image", str(image.shape))
        image = Image.fromarray(image.astype(np.uint8))
    elif not isinstance(image, Image.Image):
        raise ImageError("malformed_record", f"an image of type {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def blank_pixels(size: int, mean) -> np.ndarray:
    """uint8 [size, size, 3] of the tower's mean colour (the blind baseline's image)."""
    return np.full((size, size, 3), [round(255 * c) for c in mean], np.uint8)


def tower_pixels(image: str | os.PathLike | bytes | Image.Image | np.ndarray, size: int,
                 mean, aspect: str = "pad", blank: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image as a vision tower of `size` pixels and `mean` colour takes it: a file,
    encoded bytes, a PIL image or an array -> uint8 [size, size, 3], brought to its square by
    `aspect`. `blank`: the tower's mean colour instead (the blind baseline). ImageError when
    the image cannot be used."""
    if blank:
        return blank_pixels(size, mean)
    return resize_uint8(load_rgb(image, max_pixels), size, mean, aspect)


def preprocess(image: Image.Image, size: int, mean, std, aspect: str = "pad") -> np.ndarray:
    """RGB image -> float32 [size, size, 3] normalised (host-side, for one-off use)."""
    return normalize(resize_uint8(image, size, mean, aspect), mean, std)
