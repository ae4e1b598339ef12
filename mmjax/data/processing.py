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
    load_rgb,
    resolve_image_path,
    tower_pixels,
)
from mmjax.data.quality import Skipped
from mmjax.data.templates import IMAGE, VIDEO, ConversationError, normalize_turns
from mmjax.data.tokenize import ConversationEncoder
from mmjax.data.video import read_frames
from mmjax.data.views import model_images, video_views
from mmjax.models import anyres
from mmjax.models.config import LlavaConfig


@dataclasses.dataclass
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: ImageAspect = "pad"
    max_pixels: int = DEFAULT_MAX_PIXELS
    host_normalize: bool = False  # ship float32 instead of uint8 (measured slower)
    model: LlavaConfig | None = None  # aspect "anyres": the model whose layout images take
    video_frames: int = 32  # OneVision videos: at most this many frames (mmjax.data.video)
    video_fps: float = 1.0  # frames per second of video kept before that cap

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
            if raw.get("video") is not None:
                return self._video(sample_id, system, pairs, images, raw)
            if self.images.aspect == "anyres":
                return self._anyres(sample_id, system, pairs, images, raw)
            encoded = self.encoder.encode(system, pairs, len(images))
            self._check_count(encoded.num_images)
            pixels = self._load(images[:encoded.num_images], raw.get("image_root", ""))
        except (ConversationError, ImageError) as e:
            return Skipped(e.reason, sample_id, e.detail)
        return {"id": sample_id, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "images": pixels, "dropped_turns": encoded.dropped_turns}

    def _check_count(self, n: int) -> None:
        if n > self.max_images:
            raise ConversationError("too_long", f"{n} images > max_images_per_row "
                                    f"{self.max_images}")

    def _anyres(self, sample_id, system, pairs, images, raw) -> dict:
        """An any-resolution sample: every image's views first (their layout depends on the
        conversation's images, their token counts on the images' sizes; images of turns that
        truncation drops are read too), then the text with each image expanded to its
        count; `sources` [L] ([L, 4] and `weights`, OneVision) names the feature each image
        token takes (`anyres.sample_sources`)."""
        cfg = self.images.model
        views = model_images([np.asarray(self._rgb(im, raw.get("image_root", "")), np.uint8)
                              for im in images], cfg)
        return self._laid_out(sample_id, system, pairs, views)

    def _video(self, sample_id, system, pairs, images, raw) -> dict:
        """A OneVision video record: its frames as one image slot's views; the <image> of
        its text (LLaVA-NeXT's video data) stands for the video."""
        spec, cfg = self.images, self.images.model
        if cfg is None or cfg.video_token_id < 0:
            raise ImageError("corrupt_video", "a video record for a model that takes none")
        if images:
            raise ConversationError("malformed_record", "a record with both images and a "
                                    "video")
        video = raw["video"]  # a path under the image root, or bytes (ArrayRecord)
        if isinstance(video, str):
            video = resolve_image_path(raw.get("image_root", ""), video)
            if not video.is_file():
                raise ImageError("missing_image", f"video {raw['video']}")
        frames = read_frames(video, min(spec.video_frames, cfg.max_views), spec.video_fps,
                             max_pixels=spec.max_pixels)
        pairs = [(q if VIDEO in q else q.replace(IMAGE, VIDEO), a) for q, a in pairs]
        return self._laid_out(sample_id, system, pairs, [video_views(frames, cfg)])

    def _laid_out(self, sample_id, system, pairs, views) -> dict:
        spec, cfg = self.images, self.images.model
        encoded = self.encoder.encode(system, pairs, len(views), [v.tokens for v in views])
        self._check_count(encoded.num_images)
        views = views[:encoded.num_images]
        pixels = np.zeros((len(views), cfg.max_views, spec.size, spec.size, 3), spec.dtype)
        for k, v in enumerate(views):
            pixels[k, :len(v.pixels)] = normalize(v.pixels, spec.mean, spec.std) \
                if spec.host_normalize else v.pixels
        taps = (cfg.taps,) if cfg.taps > 1 else ()
        at = np.isin(encoded.input_ids, [cfg.image_token_id, cfg.video_token_id])
        sources = np.zeros((len(encoded.input_ids),) + taps, np.int32)
        out = {"id": sample_id, "input_ids": encoded.input_ids, "labels": encoded.labels,
               "images": pixels, "sources": sources, "dropped_turns": encoded.dropped_turns}
        if views:
            sources[at] = anyres.sample_sources(views, cfg.max_views, cfg.view_tokens)
        if taps:
            out["weights"] = np.zeros(sources.shape, np.float32)
            if views:
                out["weights"][at] = np.concatenate([v.weights for v in views])
        return out

    def _rgb(self, image, root):
        if isinstance(image, str):  # a path under the record's image root
            image = resolve_image_path(root, image)
        return load_rgb(image, self.images.max_pixels)

    def _load(self, images, root) -> np.ndarray:
        spec = self.images
        out = np.zeros((len(images), spec.size, spec.size, 3), spec.dtype)
        for k, image in enumerate(images):
            pixels = tower_pixels(self._rgb(image, root), spec.size, spec.mean, spec.aspect)
            out[k] = normalize(pixels, spec.mean, spec.std) if spec.host_normalize else pixels
        return out
