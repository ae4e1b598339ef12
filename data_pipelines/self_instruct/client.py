"""A small client for any OpenAI-compatible chat-completions endpoint.

- The API key comes from an environment variable (default OPENAI_API_KEY) and is never
  logged, cached or written anywhere.
- Retries with exponential backoff on 429, 5xx, timeouts, connection errors and replies
  that are not valid chat-completion JSON; honours Retry-After.
- A cache keyed by the request (model, messages, sampling settings; not the key) makes a
  rerun cost nothing: a cached reply is returned without a request.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailed(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 60.0
    cache_dir: str = ""
    stop: tuple[str, ...] = ()  # stop strings, sent only when given (for local models)


@dataclasses.dataclass
class Reply:
    content: str
    finish_reason: str
    cached: bool = False
    attempts: int = 0


class ChatClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
        self.requests = 0  # HTTP requests made (for reports and tests)

    def _body(self, messages: list[dict]) -> dict:
        c = self.cfg
        body = {"model": c.model, "messages": messages, "temperature": c.temperature,
                "max_tokens": c.max_tokens}
        if c.stop:  # (absent otherwise: the cache keys of earlier runs stay valid)
            body["stop"] = list(c.stop)
        return body

    def cache_key(self, messages: list[dict]) -> str:
        raw = json.dumps(self._body(messages), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()

    def complete(self, messages: list[dict]) -> Reply:
        key = self.cache_key(messages)
        path = self.cache / f"{key[:2]}/{key}.json" if self.cache else None
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                return Reply(data["content"], data["finish_reason"], cached=True)
            except (json.JSONDecodeError, KeyError):
                path.unlink()  # a damaged cache entry: ask again
        reply = self._request(messages)
        if path is not None:
            path.parent.mkdir(exist_ok=True)
            # one name per thread: jobs with the same prompt (images with the same captions)
            # may finish at once, in threads of this process
            tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps({"content": reply.content,
                                       "finish_reason": reply.finish_reason}))
            os.replace(tmp, path)
        return reply

    def _request(self, messages: list[dict]) -> Reply:
        c = self.cfg
        url = c.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps(self._body(messages)).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(c.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = ""
        for attempt in range(c.max_retries + 1):
            wait = min(c.backoff_s * 2 ** attempt, c.max_backoff_s)
            try:
                self.requests += 1
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=c.timeout_s) as resp:
                    payload = resp.read()
                reply = _parse(payload)
                reply.attempts = attempt + 1
                return reply
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise RequestFailed(f"{url}: HTTP {e.code} (not retried)") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after:
                    try:
                        wait = min(float(retry_after), c.max_backoff_s)
                    except ValueError:
                        pass
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:  # malformed reply
                last = f"malformed reply: {e}"
            if attempt < c.max_retries:
                time.sleep(wait)
        raise RequestFailed(f"{url}: gave up after {c.max_retries + 1} attempts ({last})")


def _parse(payload: bytes) -> Reply:
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: {payload[:80]!r}") from None
    if not isinstance(content, str):
        raise ValueError("message content is not text")
    return Reply(content, str(choice.get("finish_reason") or "stop"))
