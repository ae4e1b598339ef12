"""Serving: continuous batching equals the fixed-batch engine token for token; the
OpenAI-compatible server answers the official `openai` client, streams, refuses bad input in
OpenAI's error shape and keeps serving, frees the slots of clients that go away, drains on
SIGTERM; the chat page works in a real browser (Debian's chromium)."""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from serve_fixtures import Server
from tiny_runs import demo_config, make_run

from data_pipelines.self_instruct.__main__ import main as self_instruct
from mmjax import evaluate
from mmjax.data.synthetic import write_split
from mmjax.evaluation import benchmarks as bench_lib
from mmjax.evaluation.runner import run as run_eval
from mmjax.inference.load import from_checkpoint
from mmjax.inference.prompt import request
from mmjax.inference.sampling import Sampling
from mmjax.inference.slots import SlotEngine
from mmjax.serving.chat_api import Limits

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What colour are the shapes?", "How many shapes are there?",
             "Describe the image briefly.", "Which side are the shapes on? Tell me the side.",
             "What shape is in the image?"]


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    """A demo-size model's work dir (random weights: replies are long and deterministic)."""
    return make_run(tmp_path_factory.mktemp("serve-run"), demo_config(demo_data))


@pytest.fixture(scope="module")
def loaded(run):
    return from_checkpoint(str(run))


def _image_files(demo_data, n=4):
    return sorted((demo_data / "train").glob("*.png"))[:n]


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _requests(m, demo_data, n=16, seed=0):
    """n requests of different lengths: with an image or without, one to three turns."""
    rng = random.Random(seed)
    images = [m.pixels(p) for p in _image_files(demo_data)]
    out = []
    for i in range(n):
        turns = [(rng.choice(QUESTIONS) + " " * (i % 3), "Three red squares.")] * (i % 3)
        pairs = turns + [(QUESTIONS[i % len(QUESTIONS)], "")]
        out.append(request(m, pairs, [images[i % len(images)]] if i % 4 else []))
    return out


def test_slots_equal_the_engine_token_for_token_whatever_shares_the_batch(loaded, demo_data):
    """16 requests of different lengths and reply limits: greedy through 8 slots (in random
    orders and arrival times, 1, 3 or 4 decode steps per call) equals the fixed-batch
    engine; a seeded sampled reply is the same alone and in company."""
    m = loaded
    engine = m.engine()
    reqs = _requests(m, demo_data)
    limits = [4 + 5 * (i % 5) for i in range(len(reqs))]
    want = [engine.generate([r], Sampling(max_new_tokens=n))[0] for r, n in zip(reqs, limits)]
    slots = None
    try:
        # one to four decode steps per host round trip; 3 does not divide the limits
        for order_seed, steps in enumerate((1, 3, 4)):
            if slots is not None:
                slots.stop()
            slots = SlotEngine(engine, slots=8, max_prompt=160, max_new_tokens=32,
                               steps_per_call=steps).start()
            order = list(range(len(reqs)))
            random.Random(order_seed).shuffle(order)
            jobs = {}
            for i in order:
                jobs[i] = slots.submit(reqs[i], Sampling(max_new_tokens=limits[i]))
                time.sleep(random.Random(i + order_seed).choice([0, 0, 0.01, 0.03]))
            for i, job in jobs.items():
                got = job.wait(120)
                assert got.token_ids == want[i].token_ids, (steps, i)
                assert (got.text, got.finish) == (want[i].text, want[i].finish)
        hot = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9)
        alone = slots.submit(reqs[3], hot, seed=11).wait(60)
        company = [slots.submit(r, hot, seed=k) for k, r in enumerate(reqs[:8])]
        again = slots.submit(reqs[3], hot, seed=11)
        assert again.wait(60).token_ids == alone.token_ids
        [j.wait(60) for j in company]
        stats = slots.stats()
        assert stats["live"] == 0 and stats["queue"] == 0
    finally:
        slots.stop()


@pytest.fixture(scope="module")
def server(loaded):
    s = Server(loaded)
    yield s
    s.close()


def test_the_openai_client_gets_what_mmjax_generate_gives(server, loaded, demo_data):
    """The official client: plain, streamed and with an image part; greedy replies equal
    `mmjax.generate`'s (the engine over the same template), also 16 at once in random
    interleavings; streamed chunks join to the same text."""
    m = loaded
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [x.id for x in client.models.list().data] == ["demo"]
    files = _image_files(demo_data)
    engine = m.engine()

    def ask(i, stream=False):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = ([{"type": "image_url", "image_url": {"url": _data_url(files[i % 4])}}]
                   if i % 2 else []) + [{"type": "text", "text": q}]
        kw = dict(model="demo", messages=[{"role": "user", "content": content}],
                  temperature=0, max_tokens=8 + 4 * (i % 4))
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        parts, finish = [], None
        for c in client.chat.completions.create(stream=True, **kw):
            if c.choices and c.choices[0].delta.content:
                parts.append(c.choices[0].delta.content)
            if c.choices and c.choices[0].finish_reason:
                finish = c.choices[0].finish_reason
        return "".join(parts), finish

    def expected(i):
        images = [m.pixels(files[i % 4])] if i % 2 else []
        req = request(m, [(QUESTIONS[i % len(QUESTIONS)], "")], images)
        r = engine.generate([req], Sampling(max_new_tokens=8 + 4 * (i % 4)))[0]
        return r.text.lstrip(), r.finish

    want = [expected(i) for i in range(16)]
    assert ask(1) == want[1] and ask(1, stream=True) == want[1]
    got = [None] * 16

    def worker(i):
        time.sleep(random.Random(i).random() * 0.2)
        got[i] = ask(i, stream=i % 3 == 0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert got == want
    # stop strings: cut from the reply, never streamed
    text = want[1][0]
    words = [w for w in text.split()[1:] if "\ufffd" not in w]
    stop = words[len(words) // 2][:3]
    kw = dict(model="demo", temperature=0, max_tokens=16, stop=[stop], messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(files[1])}},
            {"type": "text", "text": QUESTIONS[1]}]}])
    plain = client.chat.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    assert stop not in plain.message.content and plain.finish_reason == "stop"
    assert text.startswith(plain.message.content) and streamed == plain.message.content


def test_bad_input_is_a_4xx_in_openais_shape_and_the_server_goes_on(server, loaded, tmp_path,
                                                                    demo_data):
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    img = _data_url(_image_files(demo_data)[0])

    def with_image(url, n=1):
        return {"messages": [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": url}}] * n,
            {"type": "text", "text": "what?"}]}]}

    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8)).save(
        big, "PNG")
    cases = {
        "malformed JSON": (None, b'{"messages": [', 400),
        "unknown field": ({**good, "frequency_penaltyy": 1}, None, 400),
        "n > 1": ({**good, "n": 2}, None, 400),
        "temperature out of range": ({**good, "temperature": 7}, None, 400),
        "max_tokens over the limit": ({**good, "max_tokens": 10_000}, None, 400),
        "wrong type": ({**good, "stream": "yes"}, None, 400),
        "no messages": ({"messages": []}, None, 400),
        "assistant last": ({"messages": [{"role": "user", "content": "a"},
                                         {"role": "assistant", "content": "b"}]}, None, 400),
        "undecodable image": (with_image(garbage), None, 400),
        "not base64": (with_image("data:image/png;base64,@@@"), None, 400),
        "oversized image": (with_image("data:image/png;base64," + base64.b64encode(
            big.getvalue() * 40).decode()), None, 413),
        "too many images": (with_image(img, 5), None, 400),
        "image by URL": (with_image("http://example.com/cat.png"), None, 400),
        "local file, not allowed": (with_image(str(_image_files(demo_data)[0])), None, 400),
        "prompt over the context": ({"messages": [{"role": "user", "content": "red " * 400}]},
                                    None, 400),
        "unknown model": ({**good, "model": "gpt-9"}, None, 404),
    }
    for name, (body, raw, status) in cases.items():
        got, _, err = server.post(body, raw=raw)
        assert got == status, (name, got, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, name
        assert err["error"]["message"], name
    status, _, ok = server.post(good)
    assert status == 200 and ok["choices"][0]["message"]["role"] == "assistant"
    m = server.metrics()
    assert m["mmjax_live_slots"] == 0 and m["mmjax_queue_length"] == 0


def test_api_key_local_images_and_a_full_queue(loaded, demo_data):
    files = _image_files(demo_data)
    s = Server(loaded, api_key="sekret", max_queue=0,
               limits=Limits(max_new_tokens=8, local_images=str(files[0].parent)))
    try:
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(files[0])}},
            {"type": "text", "text": "what?"}]}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, err = s.post(body, headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer sekret"}
        status, headers, err = s.post(body, key)  # a queue of 0: always full
        assert status == 429 and headers["retry-after"] == "1"
        assert err["error"]["type"] == "rate_limit_error"
        outside = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}
        assert s.post(outside, key)[0] == 403
    finally:
        s.close()
    # with --slots 0: one request at a time through the fixed-batch engine, the same API
    s = Server(loaded, api_key="sekret", slots=0, limits=Limits(
        max_new_tokens=8, local_images=str(files[0].parent)))
    try:
        status, _, ok = s.post({**body, "temperature": 0}, {"Authorization": "Bearer sekret"})
        assert status == 200, ok
        req = request(loaded, [("what?", "")], [loaded.pixels(files[0])])
        want = loaded.engine().generate([req], Sampling(max_new_tokens=8))[0]
        assert ok["choices"][0]["message"]["content"] == want.text.lstrip()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret")
        assert client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ).usage.completion_tokens <= 2
    finally:
        s.close()


def test_self_instruct_and_evaluate_go_through_the_server(server, loaded, demo_data,
                                                          tmp_path):
    """The project's own tools through `mmjax.serve`: self-instruct generates from captions
    (every request counted by the server, a rerun asks nothing, replies cut at a stop
    string become LLaVA records), and `mmjax.evaluate --endpoint` scores a benchmark exactly
    as the model loaded here does, the same unreadable image skipped."""
    files = _image_files(demo_data, 3)
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text("".join(json.dumps({
        "image_id": i, "file_name": str(f), "width": 56, "height": 56,
        "captions": ["Three red squares on the left.", "Red squares, three of them."],
        "objects": [{"name": "square", "box": [4, 8, 20, 20]}]}) + "\n"
        for i, f in enumerate(files)))
    prompts = tmp_path / "prompts"  # a short prompt: the demo model's context is 512 tokens
    prompts.mkdir()
    (prompts / "detail.txt").write_text("### system\nDescribe the image in detail.\n")

    def generate(out, *extra):
        before = server.metrics()["mmjax_requests_total"]
        summary = self_instruct([
            "--contexts", str(contexts), "--kinds", "detail", "--prompt-dir", str(prompts),
            "--base-url", server.url + "/v1", "--model", "demo", "--max-tokens", "12",
            "--temperature", "0", "--out", str(out), "--no-progress", *extra])
        return summary, server.metrics()["mmjax_requests_total"] - before

    # random weights never end a turn: every reply is cut by max_tokens and refused, counted
    summary, asked = generate(tmp_path / "a")
    assert asked == 3 and summary["requested"] == 3 and summary["rejected"] == {"truncated": 3}
    summary, asked = generate(tmp_path / "a")
    assert asked == 0 and summary["resumed"] == 3  # a rerun asks the server nothing
    kept = (tmp_path / "a" / "responses.jsonl").read_text()
    (tmp_path / "a" / "responses.jsonl").unlink()
    summary, asked = generate(tmp_path / "a")
    assert asked == 0 and summary["cached"] == 3  # nor with its replies' log gone
    assert (tmp_path / "a" / "responses.jsonl").read_text().splitlines() != [] and kept
    first = json.loads((tmp_path / "a" / "responses.jsonl").read_text().splitlines()[0])
    text = first["content"]
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                if text[i:i + 2].strip() == text[i:i + 2] and "\ufffd" not in text[i:i + 2])
    summary, asked = generate(tmp_path / "b", "--stop", stop)
    assert asked == 3 and summary["accepted"] >= 1
    records = {r["id"]: r for r in json.loads((tmp_path / "b" / "llava.json").read_text())}
    got = records[first["job"]]["conversations"][1]["value"]
    assert got == first["content"][:first["content"].index(stop)].strip()

    # mmjax.evaluate through the server = in process, skips included
    qa = write_split(demo_data, "served", 6, 56, seed=7)["qa"]
    broken = demo_data / json.loads(Path(qa).read_text())[0]["image"]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG
    here = run_eval(loaded, bench_lib.get("short_answer", qa), tmp_path / "here",
                    max_new_tokens=8, progress=False)
    there = evaluate.main(["--endpoint", server.url, "--benchmark", "short_answer", "--data",
                           str(qa), "--out", str(tmp_path / "there"), "--max-new-tokens", "8"])
    assert here["skipped"] == there["skipped"] > 0  # the questions on the broken image
    assert [t for _, t in here["answers"]] == [t for _, t in there["answers"]]
    assert here["metrics"] == there["metrics"] and there["model"]["id"] == "demo"


def test_a_client_that_goes_away_frees_its_slot(server):
    body = {"messages": [{"role": "user", "content": "Describe the image briefly."}],
            "max_tokens": 64, "stream": True, "temperature": 0}
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port))
        data = json.dumps(body).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(data)).encode() + b"\r\n\r\n" + data)
        got = b""
        while b"data:" not in got:  # the stream has started: then the client goes away
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        sock.close()
    deadline = time.time() + 30
    while time.time() < deadline and server.metrics()["mmjax_live_slots"]:
        time.sleep(0.2)
    assert server.metrics()["mmjax_live_slots"] == 0
    status, _, ok = server.post({**body, "stream": False, "max_tokens": 4})
    assert status == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cli(run, port, extra=()):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.serve", "--checkpoint", str(run),
                             "--port", str(port), "--max-new-tokens", "48", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start:\n{proc.stdout.read()}")


@pytest.mark.e2e
def test_sigterm_drains_the_live_requests_then_exits_0(run):
    port = _free_port()
    proc = _start_cli(run, port)
    results = [None] * 4

    def stream(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": QUESTIONS[i]}], "stream": True,
            "max_tokens": 48, "temperature": 0}), {"Content-Type": "application/json"})
        results[i] = conn.getresponse().read().decode()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    [t.join(120) for t in threads]
    assert proc.wait(120) == 0, proc.stdout.read()
    for r in results:
        assert r is not None and r.rstrip().endswith("data: [DONE]"), r
        assert '"finish_reason": "' in r


@pytest.mark.e2e
def test_the_chat_page_in_a_real_browser(run, demo_data, tmp_path):
    """Debian's chromium, headless, through Selenium: the page loads, an image is attached,
    a question sent, a streamed answer arrives; a screenshot is kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    proc = _start_cli(run, port)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,800",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 30).until(
            lambda d: "demo" in d.find_element(By.ID, "model").text
            or "serve-run" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "image").send_keys(str(_image_files(demo_data)[0]))
        WebDriverWait(driver, 10).until(
            lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
        WebDriverWait(driver, 10).until(  # the page took the server's reply limit
            lambda d: d.find_element(By.ID, "max-tokens").get_attribute("value") == "48")
        driver.find_element(By.ID, "prompt").send_keys("What colour are the shapes?")
        driver.find_element(By.ID, "send").click()
        answer = WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true'], .error"))[0]
        assert "assistant" in answer.get_attribute("class"), answer.text
        assert answer.text.strip()
        assert driver.find_element(By.CSS_SELECTOR, ".user img").get_attribute(
            "src").startswith("data:image/png")
        shot = tmp_path / "chat-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
