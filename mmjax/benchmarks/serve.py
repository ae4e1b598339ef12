"""Serving under load: `mmjax.serve`'s continuous batching against the same requests sent one
at a time through the fixed-batch engine, in one run.

    python -m mmjax.benchmarks.serve [--checkpoint /tmp/mmjax-demo/stage2] [--clients 8]
        [--requests 48] [--slots 8]

The model is the demo's (run `make demo` first) or any work dir / --hf directory. Requests
mix the demo's kinds: short answers (the format prompt), conversational answers and
descriptions, with and without an image, so replies run from one to about twenty tokens.

Served: the app on a loopback port (uvicorn in this process), --clients threads each
streaming one request at a time over HTTP (stream=true), until --requests are done. Time to
first token is from sending the request to its first content chunk; per-token latency is
the gap between chunks. One at a time: `Engine.generate` on each request alone, in process
(no HTTP): time to first token is a 1-token generation, per-token latency the rest of the
reply over its tokens. Both sides are warmed up first (every program compiled).

Goal (issue: serving): at 8 clients, total tokens/s at least 3x one at a time, and p99 time
to first token under 2x the one-at-a-time p99.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import queue
import socket
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np

from mmjax.data.synthetic import SHORT
from mmjax.inference.load import load
from mmjax.inference.prompt import request
from mmjax.inference.sampling import Sampling
from mmjax.inference.slots import SlotEngine
from mmjax.serving.app import build_app
from mmjax.serving.chat_api import Limits

QUESTIONS = [f"What colour are the shapes?\n{SHORT}", f"How many shapes are there?\n{SHORT}",
             "Which side are the shapes on?", "What shape is in the image?",
             "Describe the image briefly.", "Can you describe the image?",
             f"Which shape is shown?\n{SHORT}", "How many shapes do you see?"]


def _images(checkpoint: str | None) -> list[Path]:
    if checkpoint:
        found = sorted((Path(checkpoint.split(":")[0]).parent / "data" / "heldout").glob("*.png"))
        if found:
            return found[:8]
    return [Path(str(resources.files("mmjax.assets") / "chelsea.jpg"))]


def _calls(n: int, images: list[Path], max_tokens: int):
    """n chat bodies: question i mod 8, an image on three of four."""
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = [{"type": "text", "text": q}]
        if i % 4:
            img = images[i % len(images)]
            url = (f"data:image/{img.suffix[1:]};base64,"
                   + base64.b64encode(img.read_bytes()).decode())
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        out.append({"q": q, "image": img if i % 4 else None,
                    "body": {"messages": [{"role": "user", "content": content}],
                             "temperature": 0, "max_tokens": max_tokens, "stream": True,
                             "stream_options": {"include_usage": True}}})
    return out


def _stream(port: int, body: dict) -> dict:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    arrivals, tokens = [], 0
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        j = json.loads(data)
        if j.get("usage"):
            tokens = j["usage"]["completion_tokens"]
        if j.get("choices") and j["choices"][0]["delta"].get("content"):
            arrivals.append(time.perf_counter())
    conn.close()
    end = time.perf_counter()
    ttft = (arrivals[0] if arrivals else end) - t0
    return {"ttft": ttft, "gaps": list(np.diff(arrivals)), "tokens": tokens, "start": t0,
            "end": end}


def _served(m, calls, clients: int, slots: int, max_tokens: int) -> dict:
    import uvicorn  # the serve extra

    engine = SlotEngine(m.engine(), slots=slots, max_prompt=256, max_new_tokens=max_tokens)
    app = build_app(m, engine, "bench", Limits(max_new_tokens=max_tokens))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        for c in calls[:8]:  # warm-up: one at a time, then together (every program)
            _stream(port, c["body"])
        for _ in range(2):
            _run_clients(port, calls, clients)
        return _run_clients(port, calls, clients)
    finally:
        server.should_exit = True
        thread.join(60)


def _run_clients(port: int, calls, clients: int) -> dict:
    todo: queue.Queue = queue.Queue()
    for c in calls:
        todo.put(c)
    results = []
    lock = threading.Lock()

    def client():
        while True:
            try:
                c = todo.get_nowait()
            except queue.Empty:
                return
            r = _stream(port, c["body"])
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    return _figures(wall, [r["ttft"] for r in results], [g for r in results for g in r["gaps"]],
                    sum(r["tokens"] for r in results), len(results))


def _one_at_a_time(m, calls, max_tokens: int) -> dict:
    engine = m.engine()
    reqs = []
    for c in calls:
        images = [m.pixels(c["image"])] if c["image"] is not None else []
        reqs.append(request(m, [(c["q"], "")], images))
    full, first = Sampling(max_new_tokens=max_tokens), Sampling(max_new_tokens=1)
    for r in reqs[:8]:  # warm-up: every program
        engine.generate([r], full)
        engine.generate([r], first)
    ttft, gaps, tokens, wall = [], [], 0, 0.0
    for r in reqs:
        t0 = time.perf_counter()
        engine.generate([r], first)
        t1 = time.perf_counter()
        out = engine.generate([r], full)[0]
        t2 = time.perf_counter()
        n = len(out.token_ids)
        ttft.append(t1 - t0)
        wall += t2 - t1
        tokens += n
        if n > 1:
            gaps += [(t2 - t1 - (t1 - t0)) / (n - 1)] * (n - 1)
    return _figures(wall, ttft, gaps, tokens, len(reqs))


def _figures(wall, ttft, gaps, tokens, n) -> dict:
    pct = lambda xs, p: float(np.percentile(xs, p)) if len(xs) else float("nan")  # noqa
    return {"requests": n, "seconds": wall, "requests_per_s": n / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "token_p50": pct(gaps, 50), "token_p99": pct(gaps, 99)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="default: /tmp/mmjax-demo/stage2")
    src.add_argument("--hf", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or (None if args.hf else "/tmp/mmjax-demo/stage2")
    if checkpoint and not Path(checkpoint.split(":")[0]).is_dir():
        raise SystemExit(f"no run at {checkpoint}: run `make demo` first, or pass "
                         "--checkpoint / --hf")
    m = load(args.hf, checkpoint)
    calls = _calls(args.requests, _images(checkpoint), args.max_tokens)
    single = _one_at_a_time(m, calls, args.max_tokens)
    served = _served(m, calls, args.clients, args.slots, args.max_tokens)
    print(f"{args.requests} requests, {args.clients} clients, {args.slots} slots, model "
          f"{m.model_id}")
    print(f"{'':28s}{'served':>12s}{'one at a time':>16s}{'ratio':>9s}")
    rows = [("requests/s", "requests_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
            ("time to first token p50 ms", "ttft_p50", "ms"),
            ("time to first token p99 ms", "ttft_p99", "ms"),
            ("per-token latency p50 ms", "token_p50", "ms"),
            ("per-token latency p99 ms", "token_p99", "ms")]
    for label, key, fmt in rows:
        a, b = served[key], single[key]
        show = (lambda x: f"{1000 * x:.1f}") if fmt == "ms" else fmt.format
        print(f"{label:28s}{show(a):>12s}{show(b):>16s}{a / b:>8.2f}x")
    print(f"tokens generated: served {served['tokens']}, one at a time {single['tokens']}")
    goals = [("tokens/s >= 3x one at a time", served["tokens_per_s"] / single["tokens_per_s"]
              >= 3),
             ("p99 time to first token < 2x one at a time",
              served["ttft_p99"] < 2 * single["ttft_p99"])]
    for g, ok in goals:
        print(f"[{'met' if ok else 'MISSED'}] {g}")
    return {"served": served, "one_at_a_time": single, "goals": dict(goals)}


if __name__ == "__main__":
    main()
