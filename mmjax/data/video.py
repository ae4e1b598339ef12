"""Videos for LLaVA-OneVision: frames decoded with PyAV (the `video` extra: `pip install
'mmjax[video]'`) and sampled as LLaVA-NeXT's `process_video_with_decord` samples them.

Axis legend: F frames, Y height, X width, C channels (RGB).

Sampling (`frame_indices`): one frame every `round(average fps / fps)` frames (`fps`, 1 by
default, is LLaVA-NeXT's `video_fps`); when that gives more than `frames` (its
`frames_upbound`, 32 in OneVision's training), or `force` (its `force_sample`), `frames`
indices spread evenly over the whole video instead, `np.linspace(0, total - 1, frames)`
truncated to integers.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from mmjax.data.image import DEFAULT_MAX_PIXELS, ImageError

FRAMES = 32  # OneVision's frames_upbound


def frame_indices(total: int, average_fps: float, frames: int = FRAMES, fps: float = 1.0,
                  force: bool = False) -> list[int]:
    """Which of a video's `total` frames to keep (see the module doc)."""
    if total <= 0:
        return []
    step = max(1, round(average_fps / fps)) if average_fps > 0 and fps > 0 else 1
    index = list(range(0, total, step))
    if frames > 0 and (len(index) > frames or force):
        index = np.linspace(0, total - 1, frames, dtype=int).tolist()
    return index


def read_frames(video: str | os.PathLike | bytes, frames: int = FRAMES, fps: float = 1.0,
                force: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A video file or its bytes -> uint8 [F, Y, X, C], the sampled frames. ImageError
    (`corrupt_video`, `empty_video`, `image_too_large`) when it cannot be used."""
    try:
        import av  # the video extra
    except ImportError:
        raise ImageError("corrupt_video", "reading videos needs PyAV: pip install "
                         "'mmjax[video]'") from None
    source = io.BytesIO(video) if isinstance(video, bytes) else str(Path(video))
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise ImageError("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise ImageError("image_too_large", f"frames of {stream.width}x"
                                 f"{stream.height} > {max_pixels} pixels")
            rate = float(stream.average_rate or 0)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except ImageError:
        raise
    except Exception as e:  # PyAV raises many types for bad data
        raise ImageError("corrupt_video", f"{type(e).__name__}: {e}") from None
    keep = frame_indices(len(decoded), rate, frames, fps, force)
    if not keep:
        raise ImageError("empty_video", "no frames")
    return np.stack([decoded[i] for i in keep]).astype(np.uint8)
