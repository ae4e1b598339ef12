"""Image preprocessing for the vision towers (LLaVA-1.5's `pad`, resize, normalise).

Axis legend: Y height, X width, C channels (RGB).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


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


def preprocess(image: Image.Image, size: int, mean, std, aspect: str = "pad") -> np.ndarray:
    """RGB image -> float32 [size, size, 3] normalised with the tower's mean/std.

    aspect: 'pad' (LLaVA-1.5), 'resize' (squash), or 'crop' (resize the short side, centre crop).
    """
    image = image.convert("RGB")
    if aspect == "pad":
        image = expand_to_square(image, mean).resize((size, size), Image.BICUBIC)
    elif aspect == "resize":
        image = image.resize((size, size), Image.BICUBIC)
    elif aspect == "crop":
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"unknown aspect mode {aspect!r}: pad, resize or crop")
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
