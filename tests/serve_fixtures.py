"""The OpenAI-compatible app on a loopback port in the test's process (uvicorn in a thread),
with a plain HTTP client for requests the `openai` package would refuse to send."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import uvicorn

from mmjax.inference.slots import OneAtATime, SlotEngine
from mmjax.serving.app import build_app
from mmjax.serving.chat_api import Limits


class Server:
    """The app on a loopback port, in this process (uvicorn in a thread)."""

    def __init__(self, m, slots=8, api_key=None, limits=Limits(max_new_tokens=64),
                 max_queue=64, max_prompt=160):
        kw = dict(max_prompt=max_prompt, max_new_tokens=limits.max_new_tokens,
                  max_queue=max_queue)
        self.slots = (SlotEngine(m.engine(), slots=slots, **kw) if slots else
                      OneAtATime(m.engine(), **kw))  # --slots 0
        app = build_app(m, self.slots, "demo", limits, api_key=api_key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, body, headers=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", "/v1/chat/completions",
                     raw if raw is not None else json.dumps(body).encode(),
                     {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        headers = {k.lower(): v for k, v in r.getheaders()}
        return r.status, headers, json.loads(data) if data else None

    def metrics(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
                if line and not line.startswith("#") and "quantile" not in line}

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
