"""Self-instruct generation against a local chat-completions server on 127.0.0.1 that can be
told to fail: rate limits, 500s, timeouts, malformed JSON, truncated answers. Retries, the
request cache, validation with reasons, and an interrupted run resumed without loss or
duplicates."""
import collections
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_pipelines.self_instruct import parse as si_parse
from data_pipelines.self_instruct.client import ChatClient, ClientConfig, RequestFailed
from data_pipelines.self_instruct.generate import make_jobs, run
from data_pipelines.self_instruct.prompts import (
    coco_contexts,
    load_prompt,
    normalize_box,
    parse_xywh_text,
    render_context,
)

REPLIES = {
    "Design a conversation": "Question:\nWhat is in the picture?\n===\nAnswer:\nA cat sits on "
                             "a red sofa.\n===\nQuestion:\nHow many cats?\n===\nAnswer:\nOne.",
    "describe the scene in a detailed manner": "A cat rests on a red sofa near a window.",
    "create a plausible question": "Question:\nWhy might the cat be there?\n===\nAnswer:\nThe "
                                   "sofa is soft and sunny, a comfortable place to nap.",
    "Come up with": "Instruction: Count the cats.\nAnswer: There is one cat.\n\n"
                    "Instruction: What colour is the sofa?\nAnswer: Red.",
}


class Server:
    """Chat-completions on 127.0.0.1. The user's context decides the behaviour: RATE2 (two
    429s first), ERR500 (one 500), SLOW (one reply slower than the client timeout), BADJSON
    (one malformed body), TRUNC (finish_reason=length), CAPTION (a reply that mentions the
    caption), DOWN (always 503)."""

    def __init__(self, delay=0.0):
        self.attempts = collections.Counter()  # per (context, kind)
        self.served = collections.Counter()  # successful replies per (context, kind)
        self.delay = delay
        self.auth = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.add(self.headers.get("Authorization"))
                system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
                kind = next(k for k in REPLIES if k in system)
                key = (user, kind)
                server.attempts[key] += 1
                n = server.attempts[key]
                time.sleep(server.delay)
                if "DOWN" in user:
                    return self._send(503, b"down")
                if "RATE2" in user and n <= 2:
                    return self._send(429, b"slow down", {"Retry-After": "0"})
                if "ERR500" in user and n == 1:
                    return self._send(500, b"oops")
                if "SLOW" in user and n == 1:
                    time.sleep(1.5)
                if "BADJSON" in user and n == 1:
                    return self._send(200, b'{"choices": [')
                content = REPLIES[kind]
                if "CAPTION" in user:
                    content = content.replace("A cat", "As the caption says, a cat")
                finish = "length" if "TRUNC" in user else "stop"
                server.served[key] += 1
                self._send(200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                     "content": content},
                                                         "finish_reason": finish}]}).encode())

            def _send(self, code, data, headers=None):
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _cfg(url, **kw):
    return ClientConfig(url, "test-model", api_key_env="MMJAX_TEST_KEY", timeout_s=0.5,
                        max_retries=3, backoff_s=0.01, **kw)


def _contexts(words):
    return [{"image_id": i, "file_name": f"img{i}.jpg", "context": f"A cat on a sofa. {w}"}
            for i, w in enumerate(words)]


def test_retries_cache_and_validation(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_TEST_KEY", "sk-secret-123")
    words = ["fine", "RATE2", "ERR500", "SLOW", "BADJSON", "TRUNC", "CAPTION", "DOWN"]
    jobs = make_jobs(_contexts(words), ["conversation", "detail"])
    s = run(jobs, _cfg(server.url), tmp_path / "out", concurrency=4)
    assert s["jobs"] == 16 and s["failed"] == 2  # DOWN x 2 kinds, after 4 attempts each
    assert s["finished"] == 14 and s["accepted"] == 10
    assert s["rejected"] == {"truncated": 2, "mentions_annotation": 2}
    assert server.auth == {"Bearer sk-secret-123"}
    logged = "".join(p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert "sk-secret-123" not in logged  # never written anywhere
    data = json.loads((tmp_path / "out" / "llava.json").read_text())
    assert [d["id"] for d in data] == [j.id for j in jobs if j.id.split("_")[0] in
                                       {"0", "1", "2", "3", "4"}]
    conv = data[0]["conversations"]
    assert _question(conv) == "What is in the picture?" and len(conv) == 4
    detail = data[1]["conversations"]
    assert _question(detail) in si_parse.DETAIL_INSTRUCTIONS
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().split(
        "\n") if x]
    assert {r["reason"] for r in rejected} == {"truncated", "mentions_annotation"}
    # a rerun asks only for the failed jobs; the rest come from responses.jsonl
    before = sum(server.attempts.values())
    s2 = run(jobs, _cfg(server.url), tmp_path / "out", concurrency=4)
    assert s2["resumed"] == 14 and sum(server.attempts.values()) - before == 2 * 4
    # with responses.jsonl gone, the cache answers everything but the failed jobs
    (tmp_path / "out" / "responses.jsonl").unlink()
    before = sum(server.attempts.values())
    s3 = run(jobs, _cfg(server.url), tmp_path / "out", concurrency=4)
    assert s3["cached"] == 14 and sum(server.attempts.values()) - before == 2 * 4
    assert json.loads((tmp_path / "out" / "llava.json").read_text()) == data


def test_beam_run_equals_the_thread_pool_and_asks_nothing_twice(tmp_path, monkeypatch):
    """The same jobs through Apache Beam (DirectRunner, 2 worker processes, 2 requests in
    flight per worker) against a server that sometimes fails: the same accepted records,
    rejections and failures as the in-process run; a rerun asks the server nothing new."""
    pytest.importorskip("apache_beam")  # the beam extra; `make test` installs it
    from data_pipelines.self_instruct.__main__ import main as si_main

    contexts = tmp_path / "contexts.jsonl"
    words = ["fine", "RATE2", "ERR500", "SLOW", "BADJSON", "TRUNC", "CAPTION", "DOWN"] * 3
    contexts.write_text("".join(json.dumps({
        "image_id": i, "file_name": f"img{i}.jpg", "width": 200, "height": 100,
        "captions": [f"A cat number {i}. {w}"],
        "objects": [{"name": "cat", "box": "20 10 100 50"}]}) + "\n"
        for i, w in enumerate(words)))
    summaries, outputs = [], []
    for extra in ([], ["--runner", "direct", "--direct_num_workers", "2",
                       "--direct_running_mode", "multi_processing"]):
        server = Server()
        out = tmp_path / ("beam" if extra else "pool")
        args = ["--contexts", str(contexts), "--kinds", "conversation,detail", "--base-url",
                server.url, "--model", "m", "--concurrency", "2", "--out", str(out),
                "--no-progress", "--timeout", "0.5", "--max-retries", "3", "--backoff", "0.01",
                *extra]
        try:
            summaries.append(si_main(args))
            outputs.append(json.loads((out / "llava.json").read_text()))
            if extra:
                asked = sum(server.attempts.values())
                again = si_main(args)  # answered jobs resumed, failed ones asked again
                assert sum(server.attempts.values()) - asked == 6 * 4  # DOWN: 3 x 2 kinds
                assert again["resumed"] == 42 and again["accepted"] == summaries[-1]["accepted"]
        finally:
            server.close()
    pool, beam = summaries
    assert pool["jobs"] == beam["jobs"] == 48 and beam["failed"] == 6
    for key in ("finished", "accepted", "rejected", "failed", "missing"):
        assert beam[key] == pool[key], key
    assert outputs[0] == outputs[1]


def test_client_gives_up_with_a_clear_error(server):
    client = ChatClient(_cfg(server.url))
    with pytest.raises(RequestFailed, match="gave up after 4 attempts.*HTTP 503"):
        client.complete([{"role": "system", "content": "Design a conversation"},
                         {"role": "user", "content": "DOWN"}])


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    server = Server(delay=0.15)
    try:
        contexts = tmp_path / "contexts.jsonl"
        with open(contexts, "w") as f:
            for i in range(12):
                f.write(json.dumps({"image_id": i, "file_name": f"img{i}.jpg", "width": 200,
                                    "height": 100, "captions": [f"A cat number {i}."],
                                    "objects": [{"name": "cat", "box": "20 10 100 50"}]}) + "\n")
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "data_pipelines.self_instruct", "--contexts", str(contexts),
               "--kinds", "conversation,complex_reasoning", "--base-url", server.url,
               "--model", "m", "--concurrency", "2", "--out", str(out), "--no-progress"]
        env = dict(os.environ)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        responses = out / "responses.jsonl"
        while time.time() < deadline:
            if responses.exists() and len(responses.read_text().splitlines()) >= 5:
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        first = len(responses.read_text().splitlines())
        assert 5 <= first < 24  # really interrupted
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        lines = [json.loads(x) for x in responses.read_text().splitlines()]
        jobs = [x["job"] for x in lines]
        assert len(jobs) == len(set(jobs)) == 24  # every job once
        data = json.loads((out / "llava.json").read_text())
        assert len(data) == 24
        # no job was answered twice by the server (killed in-flight ones came from the cache
        # or were asked again only because their reply never arrived)
        assert sum(server.served.values()) <= 24 + 2
        assert any("cat: [0.10, 0.10, 0.60, 0.60]" in user for user, _ in server.served)
    finally:
        server.close()


def _question(turns) -> str:
    """The first question without its image, which comes before or after it."""
    value = turns[0]["value"]
    assert value.count("<image>") == 1
    assert value.startswith("<image>\n") or value.endswith("\n<image>")
    return value.replace("<image>", "").strip()


def test_contexts_and_prompts(tmp_path):
    assert normalize_box([10, 5, 40, 50], 96, 64) == [0.1, 0.08, 0.52, 0.86]
    assert normalize_box(parse_xywh_text("20 10 100 50"), 200, 100) == [0.1, 0.1, 0.6, 0.6]
    caps = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
            "annotations": [{"image_id": 1, "caption": "A dog."},
                            {"image_id": 1, "caption": "A dog runs."}]}
    inst = {"images": caps["images"], "categories": [{"id": 3, "name": "dog"}],
            "annotations": [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 25]}]}
    # COCO captions + instances in their released layout, several regions
    caps["annotations"].append({"image_id": 1, "caption": "A dog with a ball."})
    inst["categories"].append({"id": 37, "name": "sports ball"})
    inst["annotations"].append({"image_id": 1, "category_id": 37, "bbox": [72.6, 30.2, 8, 7.9],
                                "area": 63.2, "iscrowd": 0, "id": 9})
    ctx = coco_contexts(caps, inst)
    assert len(ctx) == 1 and ctx[0]["width"] == 100
    captions = "A dog.\nA dog runs.\nA dog with a ball."
    # conversation: the captions only (LLaVA's conversation prompt has no boxes)
    assert render_context(ctx[0], "conversation") == captions
    # detail / complex reasoning: captions + normalised [x1, y1, x2, y2]
    for kind in ("detail", "complex_reasoning"):
        assert render_context(ctx[0], kind) == (
            f"{captions}\ndog: [0.10, 0.20, 0.60, 0.70]\nsports ball: [0.73, 0.60, 0.81, 0.76]")
    # multitask: the seed's layout, one line per region, left-top corner and size in pixels
    assert render_context(ctx[0], "multitask") == (
        f"{captions}\ndog X: 10 Y: 10 Width: 50 Height: 25\n"
        "sports ball X: 73 Y: 30 Width: 8 Height: 8")
    jobs = make_jobs(ctx, ["conversation", "multitask"], n_instructions=20)
    users = [dict(j.messages[-1])["content"] for j in jobs]
    assert users == [render_context(ctx[0], "conversation"), render_context(ctx[0], "multitask")]
    multitask = dict(jobs[1].messages[0])["content"]
    assert "Come up with 20 diverse instructions" in multitask and "less than 30 words" in multitask
    assert "X: 282 Y: 144 Width: 51 Height: 29" in "".join(
        dict(m)["content"] for m in jobs[1].messages)  # the few-shot example uses it too
    for kind in ("conversation", "detail", "complex_reasoning", "multitask"):
        p = load_prompt(kind)
        assert p.system and p.examples
        msgs = p.messages("ctx", n=4) if kind == "multitask" else p.messages("ctx")
        assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "ctx"}
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(p.examples)
    assert "4 diverse instructions" in load_prompt("multitask").messages("c", n=4)[0]["content"]
    # users' own prompt files
    (tmp_path / "conversation.txt").write_text("### system\nBe brief.\n### example\n## context\n"
                                               "c\n## response\nQuestion: q\n===\nAnswer: a\n")
    assert load_prompt("conversation", tmp_path).system == "Be brief."


def test_parse_and_validate():
    ok = si_parse.parse("multitask", REPLIES["Come up with"], "stop", "k")
    assert _question(ok) == "Count the cats."
    assert [t["value"] for t in ok[1:]] == ["There is one cat.", "What colour is the sofa?",
                                            "Red."]
    # <image> before or after the first question, seeded per job: both occur, reproducibly
    firsts = [si_parse.parse("multitask", REPLIES["Come up with"], "stop", f"job{i}")[0]
              ["value"] for i in range(20)]
    assert firsts == [si_parse.parse("multitask", REPLIES["Come up with"], "stop", f"job{i}")[0]
                      ["value"] for i in range(20)]
    assert {f.startswith("<image>") for f in firsts} == {True, False}
    cases = {
        "truncated": ("conversation", REPLIES["Design a conversation"], "length"),
        "unparsable": ("conversation", "Just some text.", "stop"),
        "empty": ("detail", "  ", "stop"),
        "answer_too_long": ("multitask", "Instruction: x\nAnswer: " + "word " * 40, "stop"),
        "mentions_annotation": ("detail", "The bounding boxes show a dog.", "stop"),
        "mentions_annotation ": ("multitask", "Instruction: Where?\nAnswer: At X: 10 Y: 20.",
                                 "stop"),
    }
    for reason, (kind, text, finish) in cases.items():
        with pytest.raises(si_parse.Rejected) as e:
            si_parse.parse(kind, text, finish, "k")
        assert e.value.reason == reason.strip()
    with pytest.raises(si_parse.Rejected, match="mentions_annotation"):
        si_parse.parse("detail", "A dog at [0.12, 0.40] in the park.", "stop", "k")
