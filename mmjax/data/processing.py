"""One raw sample -> token ids, labels and uint8 images (runs in the Grain workers).

Anything wrong with a sample becomes a `quality.Skipped` marker with its reason; nothing in
here raises on bad data.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.batch import normalize
from mmjax.data.image import (
    DEFAULT_MAX_PIXELS,
    ImageAspect,
    ImageError,
    resolve_image_path,
    tower_pixels,
)
from mmjax.data.quality import Skipped
from mmjax.data.templates import ConversationError, normalize_turns
from mmjax.data.tokenize import ConversationEncoder


@dataclasses.dataclass
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: ImageAspect = "pad"
    max_pixels: int = DEFAULT_MAX_PIXELS
    host_normalize: bool = False  # ship float32 instead of uint8 (measured slower)

    @property
    def dtype(self):
        return np.float32 if self.host_normalize else np.uint8


class SampleProcessor:
    """Callable for `grain.MapDataset.map`: raw record -> processed sample or Skipped."""

    def __init__(self, encoder: ConversationEncoder, images: ImageSpec, max_images: int):
        self.encoder, self.images, self.max_images = encoder, images, max_images

    def __call__(self, raw):
        if isinstance(raw, Skipped):
            return raw
        sample_id = str(raw.get("id", "?"))
        try:
            system, pairs = normalize_turns(raw.get("conversations"))
            images = raw.get("images") or []
            if not isinstance(images, list):
                raise ConversationError("malformed_record", "images is not a list")
            encoded = self.encoder.encode(system, pairs, len(images))
            if encoded.num_images > self.max_images:
                raise ConversationError("too_long", f"{encoded.num_images} images > "
                                        f"max_images_per_row {self.max_images}")
            pixels = self._load(images[:encoded.num_images], raw.get("image_root", ""))
        except (ConversationError, ImageError) as e:
            return Skipped(e.reason, sample_id, e.detail)
        return {"id": sample_id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "images": pixels, "dropped_turns": encoded.dropped_turns}

    def _load(self, images, root) -> np.ndarray:
        spec = self.images
        out = np.zeros((len(images), spec.size, spec.size, 3), spec.dtype)
        for k, image in enumerate(images):
            if isinstance(image, str):  # a path under the record's image root
                image = resolve_image_path(root, image)
            pixels = tower_pixels(image, spec.size, spec.mean, spec.aspect,
                                  max_pixels=spec.max_pixels)
            out[k] = normalize(pixels, spec.mean, spec.std) if spec.host_normalize else pixels
        return out
