"""Answering benchmark questions through an OpenAI-compatible chat-completions server
(`python -m mmjax.serve`, or any server that takes `image_url` parts), instead of a model
loaded in this process: `python -m mmjax.evaluate --endpoint URL`.

Each question is one user message, the image first as a data URL, then the text (LLaVA's
layout, the one `inference.prompt.request` gives a local model), asked greedily
(temperature 0) with the benchmark's reply limit; the server applies its model's template.
A batch's questions are in flight together (the server's continuous batching serves them
at once). Busy answers (429, 503) and lost connections are retried with backoff; any other
refusal is an `EndpointError` with the server's message, never an empty answer.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from mmjax.data.image import decode_image

RETRY_STATUS = (429, 502, 503, 504)


class EndpointError(RuntimeError):
    """The server refused a question or could not be reached."""


def image_url(image: str | Path | bytes) -> str:
    """A data URL of an image file or its bytes, as they are (nothing re-encoded); ImageError
    (or OSError) for one that a local read would refuse."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    decode_image(data)  # empty, corrupt or truncated: refused here, as locally
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "png").lower()
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode()


class Endpoint:
    """`url`: the API's base (http://HOST:PORT or http://HOST:PORT/v1). `model`: the id to
    ask for (default: the first the server lists). `api_key`: sent as a bearer token."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, retries: int = 5, backoff: float = 0.5):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key, self.timeout = api_key, timeout
        self.retries, self.backoff = retries, backoff
        self.model = model or self._first_model()

    def ask(self, questions: list[tuple[str, str | None]], max_tokens: int) -> list[str]:
        """Replies to (text, image data URL or None) questions, in order, all in flight."""
        if not questions:
            return []
        with concurrent.futures.ThreadPoolExecutor(min(32, len(questions))) as pool:
            return list(pool.map(lambda q: self._one(*q, max_tokens), questions))

    def _one(self, text: str, image: str | None, max_tokens: int) -> str:
        content = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + [
            {"type": "text", "text": text}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "max_tokens": max_tokens}
        reply = self._call("POST", "/chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.base}: a reply without choices: "
                                f"{json.dumps(reply)[:200]}") from None

    def _first_model(self) -> str:
        data = self._call("GET", "/models").get("data") or []
        if not data:
            raise EndpointError(f"{self.base}/models lists no model")
        return data[0]["id"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base + path, data, headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode(errors="replace")
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise EndpointError(f"{method} {self.base}{path}: HTTP {e.code}: "
                                        f"{detail}") from None
                wait = float(e.headers.get("Retry-After") or 0)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt == self.retries:
                    raise EndpointError(f"{method} {self.base}{path}: {e}") from None
                wait = 0.0
            time.sleep(max(wait, self.backoff * 2 ** attempt))
        raise AssertionError("unreachable")
