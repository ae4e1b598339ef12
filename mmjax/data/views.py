"""A sample's images as an any-resolution model takes them (mmjax.models.anyres): LLaVA-NeXT
tiles every image; LLaVA-OneVision tiles (and pools, `anyres_max`) an image that is alone in
its conversation, and gives each of several images one square view (padded with the tower's
mean colour, as its processor's `pad_to_square`) with one newline. Which layout an image gets
depends on the conversation, so the generation commands and the data pipeline both decide it
here, from the decoded images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from mmjax.data.image import ImageError, resize_uint8
from mmjax.models import anyres
from mmjax.models.config import LlavaConfig


def model_images(images: Sequence[np.ndarray], cfg: LlavaConfig) -> list[anyres.ImageViews]:
    """uint8 [H, W, 3] images of one conversation -> their `ImageViews`, in order."""
    v = cfg.vision
    if not cfg.anyres_max:  # LLaVA-NeXT
        return [anyres.prepare(im, cfg.image_grid_pinpoints, v.image_size, v.patch_size)
                for im in images]
    n = v.image_size // v.patch_size
    if len(images) == 1:
        (im,) = images
        pixels, _ = anyres.views(im, cfg.image_grid_pinpoints, v.image_size)
        src, wts = anyres.feature_taps(*im.shape[:2], cfg.image_grid_pinpoints, v.image_size,
                                       v.patch_size, cfg.anyres_max)
        return [anyres.ImageViews(pixels, src, im.shape[:2], wts)]
    out = []
    for im in images:  # several: one square view each
        square = resize_uint8(Image.fromarray(im), v.image_size, v.image_mean, "pad")
        src, wts = anyres.square_taps(n)
        out.append(anyres.ImageViews(square[None], src, im.shape[:2], wts))
    return out


def video_views(frames: np.ndarray, cfg: LlavaConfig) -> anyres.ImageViews:
    """uint8 [F, H, W, 3] sampled frames (mmjax.data.video) -> OneVision's video layout: each
    frame resized to the tower's square (bicubic, aspect not kept: its video processor's
    `size`), its features pooled 2 x 2, one newline after the last frame."""
    if cfg.video_token_id < 0:
        raise ImageError("corrupt_video", "this model takes no video (LLaVA-OneVision does)")
    if len(frames) > cfg.max_views:
        raise ImageError("too_long", f"{len(frames)} frames; the model's image slots hold "
                         f"{cfg.max_views} views (sample fewer frames)")
    v = cfg.vision
    pixels = np.stack([np.asarray(Image.fromarray(f).resize((v.image_size, v.image_size),
                                                            Image.Resampling.BICUBIC))
                       for f in frames])
    src, wts = anyres.video_taps(len(frames), v.image_size // v.patch_size)
    return anyres.ImageViews(pixels, src, tuple(frames.shape[1:3]), wts, video=True)
