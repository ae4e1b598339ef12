"""OpenAI's chat-completions API in mmjax's terms: a request body -> the engine's request,
sampling settings and seed (or an `APIError` in OpenAI's error shape); results -> response
bodies and stream chunks.

A conversation is rendered with the model's template exactly as `mmjax.chat` renders it:
each image part becomes `<image>` followed by a newline at its place in its message, so one
image before the first question gives LLaVA's layout and the same ids as the chat command.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import time
import uuid
from pathlib import Path

import numpy as np

from mmjax.data.image import ImageError
from mmjax.data.templates import IMAGE, VIDEO
from mmjax.errors import UsageError
from mmjax.inference.engine import Request
from mmjax.inference.load import Loaded
from mmjax.inference.prompt import request as build_request
from mmjax.inference.sampling import Sampling

FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p",
          "max_tokens", "max_completion_tokens", "stop", "seed", "n", "user"}
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An error answered in OpenAI's shape: HTTP `status`, {"error": {...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts."""

    max_images: int = 4  # per conversation
    max_image_bytes: int = 20 << 20  # per image, encoded
    max_videos: int = 1  # per conversation (LLaVA-OneVision models)
    max_video_bytes: int = 100 << 20  # per video, encoded
    video_frames: int = 32  # at most this many frames per video (mmjax.data.video)
    video_fps: float = 1.0  # frames per second of video kept before that cap
    max_image_pixels: int = 50_000_000  # per image, decoded (width x height)
    max_new_tokens: int = 256  # the most max_tokens may ask
    local_images: str | None = None  # a directory local image paths may come from


@dataclasses.dataclass
class ChatCall:
    request: Request
    sampling: Sampling
    seed: int
    stream: bool
    include_usage: bool
    model: str


def parse(body, m: Loaded, limits: Limits, model_id: str) -> ChatCall:
    """The engine's request for a chat-completions body; APIError (400) naming what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}; this server takes "
                       f"{', '.join(sorted(FIELDS))}", param=unknown[0])
    model = body.get("model", model_id)
    if model != model_id:
        raise APIError(404, f"the model {model!r} does not exist; this server has "
                       f"{model_id!r}", param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1 (one choice per request)", param="n")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None) or {}
    if set(options) - {"include_usage"}:
        raise APIError(400, "stream_options takes include_usage only", param="stream_options")
    sampling = _sampling(body, limits)
    seed = _typed(body, "seed", int, 0)
    if not 0 <= seed < 2 ** 32:
        raise APIError(400, "seed must be in [0, 2**32)", param="seed")
    system, pairs, images, videos = _conversation(body.get("messages"), m, limits)
    try:
        req = build_request(m, pairs, images, system, videos)
    except UsageError as e:
        raise APIError(400, str(e), param="messages") from None
    return ChatCall(req, sampling, seed, stream, bool(options.get("include_usage")), model_id)


def _typed(body: dict, name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    numbers = (int, float) if kind is float else kind
    is_bool = isinstance(value, bool) and kind is not bool  # True is an int to Python
    if is_bool or not isinstance(value, numbers):
        raise APIError(400, f"{name} must be {kind.__name__}, got {type(value).__name__}",
                       param=name)
    return value


def _sampling(body: dict, limits: Limits) -> Sampling:
    temperature = float(_typed(body, "temperature", float, 1.0))
    top_p = float(_typed(body, "top_p", float, 1.0))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _typed({name: max_tokens}, name, int, limits.max_new_tokens)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}",
                       param="temperature")
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise APIError(400, f"{name} must be in [1, {limits.max_new_tokens}], got "
                       f"{max_tokens}", param=name)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(
            isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them",
                       param="stop")
    return Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    stop=tuple(stop))


def _conversation(messages, m: Loaded, limits: Limits):
    """(system, [(question, answer)], images, videos) of the messages; the last answer
    empty."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    system = None
    turns: list[tuple[str, str]] = []
    images: list[np.ndarray] = []
    videos: list = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise APIError(400, f"{where}: a message is an object with a role in "
                           f"{ROLES}", param=where)
        text = _content(msg.get("content"), msg["role"], where, m, limits, images, videos)
        role = msg["role"]
        if role == "system":
            if i != 0:
                raise APIError(400, f"{where}: a system message goes first", param=where)
            system = text
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise APIError(400, f"{where}: two user messages in a row", param=where)
            turns.append((text, None))
        else:
            if not turns or turns[-1][1] is not None:
                raise APIError(400, f"{where}: an assistant message answers a user message",
                               param=where)
            turns[-1] = (turns[-1][0], text)
    if not turns or turns[-1][1] is not None:
        raise APIError(400, "the last message must be the user's", param="messages")
    return system, [(q, a or "") for q, a in turns], images, videos


def _content(content, role: str, where: str, m: Loaded, limits: Limits,
             images: list, videos: list) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of parts",
                       param=where)
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("image_url", "video_url") and role == "user":  # video_url: vLLM's
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, f"{at}: {kind}.url must be a string", param=at)
            image = kind == "image_url"
            held, limit = (images, limits.max_images) if image else (videos, limits.max_videos)
            if len(held) >= limit:
                raise APIError(400, f"more than {limit} {'images' if image else 'video(s)'} "
                               "in the conversation", param=at)
            held.append((_image if image else _video)(url, at, m, limits))
            out.append(f"{IMAGE if image else VIDEO}\n")
        else:
            raise APIError(400, f"{at}: a part is {{'type': 'text', 'text': ...}} or, in a "
                           "user message, {'type': 'image_url', 'image_url': {'url': ...}} "
                           "(or video_url, for a LLaVA-OneVision model)", param=at)
    return "".join(out)


def _image(url: str, at: str, m: Loaded, limits: Limits) -> np.ndarray:
    """The tower's pixels of an image given as a data URL or (when allowed) a local path."""
    source = _bytes(url, at, limits, "image", limits.max_image_bytes)
    try:
        return m.pixels(source, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise APIError(400, f"{at}: the image cannot be read ({e})", param=at,
                       code="invalid_image") from None


def _video(url: str, at: str, m: Loaded, limits: Limits):
    """A video's views (LLaVA-OneVision), given as a data URL or (when allowed) a path."""
    if m.cfg.video_token_id < 0:
        raise APIError(400, f"{at}: this model takes no video", param=at)
    source = _bytes(url, at, limits, "video", limits.max_video_bytes)
    try:
        return m.video(source, limits.video_frames, limits.video_fps,
                       max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise APIError(400, f"{at}: the video cannot be read ({e})", param=at,
                       code="invalid_video") from None


def _bytes(url: str, at: str, limits: Limits, what: str, max_bytes: int) -> bytes:
    """The bytes of a media part: a base64 data URL or (when allowed) a local file."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise APIError(400, f"{at}: a data URL must be base64 (data:{what}/...;base64,"
                           "...)", param=at)
        if len(data) * 3 // 4 > max_bytes:
            raise APIError(413, f"{at}: the {what} is over {max_bytes} bytes",
                           param=at, code=f"{what}_too_large")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{at}: the data URL is not valid base64", param=at) from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{at}: this server does not fetch {what} URLs; send the {what} "
                       f"as a data URL (data:{what}/...;base64,...)", param=at)
    path = Path(url.removeprefix("file://"))
    root = limits.local_images
    if root is None:
        raise APIError(400, f"{at}: local {what} paths are off (the server's "
                       "--allow-local-images DIR turns them on for DIR)", param=at)
    resolved = path.resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise APIError(403, f"{at}: {url} is outside the allowed image directory",
                       param=at, code=f"{what}_not_allowed")
    if not resolved.is_file():
        raise APIError(400, f"{at}: no {what} file {url}", param=at)
    if resolved.stat().st_size > max_bytes:
        raise APIError(413, f"{at}: the {what} is over {max_bytes} bytes",
                       param=at, code=f"{what}_too_large")
    return resolved.read_bytes()


# --------------------------------------------------------------------------- responses


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None,
          usage_: dict | None = None, choices: bool = True) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                        "logprobs": None}] if choices else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out
