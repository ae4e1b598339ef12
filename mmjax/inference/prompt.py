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
        ids = m.raw_prompt_ids(text)
    else:
        placed = sum(q.count(IMAGE) for q, _ in pairs)
        if images and not placed:
            pairs = [(f"{IMAGE}\n" * len(images) + pairs[0][0], pairs[0][1]), *pairs[1:]]
        try:
            ids = m.encoder().prompt_ids(system, pairs)
        except ConversationError as e:
            raise UsageError(f"prompt: {e}") from None
    n = int(np.sum(ids == m.cfg.image_token_id)) // max(1, m.cfg.image_tokens)
    if n != len(images):
        raise UsageError(f"the prompt has {n} {IMAGE} for {len(images)} image(s)")
    return Request(ids, images)
