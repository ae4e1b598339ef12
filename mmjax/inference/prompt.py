"""Requests for the engine: a conversation (and its images) -> prompt ids as training laid
them out, through the model's template (or the raw text, each <image> expanded)."""
from __future__ import annotations

import numpy as np

from mmjax.data.templates import IMAGE, ConversationError
from mmjax.errors import UsageError
from mmjax.inference.engine import Request
from mmjax.inference.load import RAW, Loaded


def request(m: Loaded, pairs: list[tuple[str, str]], images: list[np.ndarray],
            system: str | None = None) -> Request:
    """The request for a conversation whose last question is to be answered.

    With a template, a conversation with images but no <image> in its text gets LLaVA's
    layout (the image first, then the question); `raw` takes the last question as the
    model's text. UsageError when the prompt and the images do not agree."""
    if m.template == RAW:
        text = pairs[-1][0]
        if images and IMAGE not in text:
            raise UsageError(f"--template raw: put {IMAGE} in the prompt where each image goes")
        placed = text.count(IMAGE)
    else:
        placed = sum(q.count(IMAGE) for q, _ in pairs)
        if images and not placed:
            pairs = [(f"{IMAGE}\n" * len(images) + pairs[0][0], pairs[0][1]), *pairs[1:]]
            placed = len(images)
    if placed != len(images):
        raise UsageError(f"the prompt has {placed} {IMAGE} for {len(images)} image(s)")
    images = m.model_images(images)
    counts = m.image_tokens(images)
    if m.template == RAW:
        ids = m.raw_prompt_ids(text, counts)
    else:
        try:
            ids = m.encoder().prompt_ids(system, pairs, counts)
        except ConversationError as e:
            raise UsageError(f"prompt: {e}") from None
    return Request(ids, images)
