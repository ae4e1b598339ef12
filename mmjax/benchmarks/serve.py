"""Serving under load: `mmjax.serve`'s continuous batching against the same requests sent one
at a time to `mmjax.serve --slots 0` (the fixed-batch engine, one request at a time), in one
run.

    python -m mmjax.benchmarks.serve [--checkpoint /tmp/mmjax-demo/stage2] [--clients 8]
        [--requests 48] [--slots 8] [--steps-per-call 4]

The model is the demo's (run `make demo` first) or any work dir / --hf directory. Requests
mix the demo's kinds: short answers (the format prompt), conversational answers and
descriptions, with and without an image, so replies run from one to about twenty tokens.

Both servers run as `python -m mmjax.serve` processes on a loopback port, as a user runs
them; this process is the client. Served: --clients threads each stream one request at a
time (stream=true) until --requests are done. One at a time: one client, the same requests,
the same streaming API, against the server with --slots 0. Time to first token is from
sending a request to its first content chunk; time per output token is, per request, the
rest of its reply over its other tokens (vLLM's benchmark's TPOT: chunks may carry several
tokens). Both servers are warmed up first on the same requests (every program compiled).
A third column gives the same requests through `Engine.generate` in this process, without
HTTP or streaming: the floor of what one request alone costs.

Goal (issue: serving): at 8 clients, total tokens/s at least 3x one at a time, and p99 time
to first token under 2x the one-at-a-time p99.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import jax
import numpy as np

from mmjax.data.synthetic import SHORT
from mmjax.inference.load import load
from mmjax.inference.prompt import request
from mmjax.inference.sampling import Sampling

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
    tpot = (end - t0 - ttft) / (tokens - 1) if tokens > 1 else None
    return {"ttft": ttft, "tpot": tpot, "tokens": tokens}


class _Server:
    """`python -m mmjax.serve` on a free loopback port, until closed (SIGTERM)."""

    def __init__(self, source: list[str], slots: int, steps: int, max_tokens: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mmjax.serve", *source, "--port", str(self.port),
               "--slots", str(slots), "--steps-per-call", str(steps), "--max-prompt", "256",
               "--max-new-tokens", str(max_tokens), "--max-queue", "256"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{self.proc.stderr.read()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"{' '.join(cmd)} did not come up in 600 s")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _served(source, calls, clients: int, slots: int, steps: int, max_tokens: int) -> dict:
    server = _Server(source, slots, steps, max_tokens)
    try:
        for c in calls[:8]:  # warm-up: one at a time, then together (every program)
            _stream(server.port, c["body"])
        for _ in range(2):
            _run_clients(server.port, calls, clients)
        return _run_clients(server.port, calls, clients)
    finally:
        server.close()


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
    return _figures(wall, [r["ttft"] for r in results],
                    [r["tpot"] for r in results if r["tpot"] is not None],
                    sum(r["tokens"] for r in results), len(results))


def _in_process(m, calls, max_tokens: int) -> dict:
    engine = m.engine()
    reqs = []
    for c in calls:
        images = [m.pixels(c["image"])] if c["image"] is not None else []
        reqs.append(request(m, [(c["q"], "")], images))
    full, first = Sampling(max_new_tokens=max_tokens), Sampling(max_new_tokens=1)
    for r in reqs[:8]:  # warm-up: every program
        engine.generate([r], full)
        engine.generate([r], first)
    ttft, tpot, tokens, wall = [], [], 0, 0.0
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
            tpot.append((t2 - t1 - (t1 - t0)) / (n - 1))
    return _figures(wall, ttft, tpot, tokens, len(reqs))


def _figures(wall, ttft, tpot, tokens, n) -> dict:
    pct = lambda xs, p: float(np.percentile(xs, p)) if len(xs) else float("nan")  # noqa
    return {"requests": n, "seconds": wall, "requests_per_s": n / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="default: /tmp/mmjax-demo/stage2")
    src.add_argument("--hf", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--steps-per-call", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or (None if args.hf else "/tmp/mmjax-demo/stage2")
    if checkpoint and not Path(checkpoint.split(":")[0]).is_dir():
        raise SystemExit(f"no run at {checkpoint}: run `make demo` first, or pass "
                         "--checkpoint / --hf")
    source = ["--hf", args.hf] if args.hf else ["--checkpoint", checkpoint]
    m = load(args.hf, checkpoint)
    calls = _calls(args.requests, _images(checkpoint), args.max_tokens)
    alone = _in_process(m, calls, args.max_tokens)
    single = _served(source, calls, 1, 0, 1, args.max_tokens)
    served = _served(source, calls, args.clients, args.slots, args.steps_per_call,
                     args.max_tokens)
    print(f"{args.requests} requests, model {m.model_id}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); served: {args.clients} clients, "
          f"{args.slots} slots, {args.steps_per_call} steps per call")
    print(f"{'':30s}{'served':>10s}{'one at a time':>15s}{'ratio':>8s}{'in process':>12s}")
    rows = [("requests/s", "requests_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
            ("time to first token p50 ms", "ttft_p50", "ms"),
            ("time to first token p99 ms", "ttft_p99", "ms"),
            ("time per output token p50 ms", "tpot_p50", "ms"),
            ("time per output token p99 ms", "tpot_p99", "ms")]
    for label, key, fmt in rows:
        a, b, c = served[key], single[key], alone[key]
        show = (lambda x: f"{1000 * x:.1f}") if fmt == "ms" else fmt.format
        print(f"{label:30s}{show(a):>10s}{show(b):>15s}{a / b:>7.2f}x{show(c):>12s}")
    print(f"tokens generated: served {served['tokens']}, one at a time {single['tokens']}, "
          f"in process {alone['tokens']}")
    goals = [("tokens/s >= 3x one at a time", served["tokens_per_s"] / single["tokens_per_s"]
              >= 3),
             ("p99 time to first token < 2x one at a time",
              served["ttft_p99"] < 2 * single["ttft_p99"])]
    for g, ok in goals:
        print(f"[{'met' if ok else 'MISSED'}] {g}")
    return {"served": served, "one_at_a_time": single, "in_process": alone,
            "goals": dict(goals)}


if __name__ == "__main__":
    main()
