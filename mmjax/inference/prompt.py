"""Requests for the engine: a conversation (and its images and videos) -> prompt ids as
training laid them out, through the model's template (or the raw text, each <image> and
<video> expanded)."""
from __future__ import annotations

import re

import numpy as np

from mmjax.data.templates import IMAGE, VIDEO, ConversationError
from mmjax.errors import UsageError
from mmjax.inference.engine import Request
from mmjax.inference.load import RAW, Loaded


def request(m: Loaded, pairs: list[tuple[str, str]], images: list[np.ndarray],
            system: str | None = None, videos: list = ()) -> Request:
    """The request for a conversation whose last question is to be answered. `images` as
    `Loaded.pixels` gives them, `videos` as `Loaded.read_video` does, each in the order its
    placeholder comes in the text.

    With a template, a conversation with images (videos) but no <image> (<video>) in its
    text gets LLaVA's layout: the images first, then the question; `raw` takes the last
    question as the model's text. UsageError when the prompt and the media do not agree."""
    if m.template == RAW:
        text = pairs[-1][0]
        if (images and IMAGE not in text) or (videos and VIDEO not in text):
            raise UsageError(f"--template raw: put {IMAGE} (or {VIDEO}) in the prompt where "
                             "each image (video) goes")
        texts = [text]
    else:
        texts = [q for q, _ in pairs]
        lead = "".join(f"{VIDEO}\n" for _ in videos if VIDEO not in "".join(texts)) + "".join(
            f"{IMAGE}\n" for _ in images if IMAGE not in "".join(texts))
        if lead:
            pairs = [(lead + pairs[0][0], pairs[0][1]), *pairs[1:]]
            texts = [q for q, _ in pairs]
    tags = f"{IMAGE}|{VIDEO}" if m.cfg.video_token_id >= 0 else IMAGE
    order = re.findall(tags, "".join(texts))
    placed = order.count(IMAGE)
    if placed != len(images):
        raise UsageError(f"the prompt has {placed} {IMAGE} for {len(images)} image(s)")
    if order.count(VIDEO) != len(videos):
        raise UsageError(f"the prompt has {order.count(VIDEO)} {VIDEO} for {len(videos)} "
                         "video(s)")
    pictures, clips = iter(m.model_images(images)), iter(videos)
    media = [next(pictures) if tag == IMAGE else next(clips) for tag in order]
    counts = m.image_tokens(media)
    if m.template == RAW:
        ids = m.raw_prompt_ids(texts[0], counts)
    else:
        try:
            ids = m.encoder().prompt_ids(system, pairs, counts)
        except ConversationError as e:
            raise UsageError(f"prompt: {e}") from None
    return Request(ids, media)
