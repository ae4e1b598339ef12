"""data_pipelines on Apache Beam (Beam's own DirectRunner, 2 worker processes): the same
records as the in-process build, byte for byte, with the same skip counts, on thousands of
samples in the released layouts (LLaVA JSON with repeated ids, WebDataset tars with a
corrupt member and a truncated tar, VQAv2's question and annotation files, img2dataset's
parquet output and a URL table fetched from a local image host); reruns and a killed run
give the same output; mmjax.train trains on what it writes."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runs import overrides, train

from data_pipelines.convert import main as convert_main
from data_pipelines.core import BuildError
from mmjax import configlib
from mmjax.data.records import decode

pytest.importorskip("apache_beam")  # the beam extra; `make test` installs it

ROOT = Path(__file__).resolve().parent.parent
TWO_WORKERS = ["--runner", "direct", "--direct_num_workers", "2",
               "--direct_running_mode", "multi_processing"]
IN_MEMORY = ["--runner", "direct"]


def _png(seed: int, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3),
                                                        np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _conv(answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": answer}]


class _Images(http.server.BaseHTTPRequestHandler):
    """A local image host: /ok/N.png an image, /flaky/N a 503 the first time then the image,
    /slow an answer after 1.5 s, /html a web page, anything else 404."""

    seen: set = set()

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path
        if path == "/slow":
            time.sleep(1.5)
        if path.startswith("/flaky/") and path not in self.seen:
            self.seen.add(path)
            return self._send(503, b"busy", "text/plain")
        if path.startswith(("/ok/", "/flaky/", "/slow")):
            return self._send(200, _png(int(path.rsplit("/", 1)[-1].split(".")[0] or 0)
                                        if path != "/slow" else 7), "image/png")
        if path == "/html":
            return self._send(200, b"<html>not an image</html>", "text/html")
        self._send(404, b"no such image", "text/plain")

    def _send(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # a client that timed out and went away
            pass

    def log_message(self, *args):
        pass


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """2,000 LLaVA JSON records, 4 WebDataset tars of 500 samples, VQAv2 files for 300
    images, img2dataset parquet files and a URL table on a local image host: repeated ids,
    missing, corrupt and truncated images, malformed records, failed downloads."""
    root = tmp_path_factory.mktemp("beam-raw")
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}"
    (root / "img").mkdir()
    for i in range(300):
        (root / "img" / f"{i}.png").write_bytes(_png(i))
    (root / "img" / "broken.png").write_bytes(b"\x89PNG garbage")
    recs = []
    for i in range(2000):
        rid = f"r{i}" if i % 7 else f"r{i // 3}"  # every 7th repeats an earlier id
        image = f"img/{i % 300}.png"
        if i % 50 == 0:
            image = "img/missing.png" if i % 100 else "img/broken.png"
        recs.append({"id": rid, "image": image, "conversations": _conv(f"answer {i}")}
                    if i % 97 else {"id": rid, "image": image})  # no conversations
    (root / "llava.json").write_text(json.dumps(recs))
    for t in range(4):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tf:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            for i in range(500):
                key = f"{t:05d}{i:04d}"
                data = _png(t * 1000 + i % 60)
                if i == 7:
                    data = data[:len(data) // 3]  # a corrupt member
                if i != 11:  # a sample without its image
                    add(f"{key}.png", data)
                if i == 13:
                    add(f"{key}.json", b"{not json")
                elif i % 2:
                    add(f"{key}.json", json.dumps({"caption": f"json caption {t} {i}"}).encode())
                else:
                    add(f"{key}.txt", f"text caption {t} {i}".encode())
    cut = root / "00003.tar"  # a truncated tar: what was read counts, the rest is a skip
    cut.write_bytes(cut.read_bytes()[:int(cut.stat().st_size * 0.7)])
    questions, annotations = [], []
    for i in range(300):
        for k in range(3):
            qid = i * 10 + k
            questions.append({"image_id": i, "question": f"Question {k}?", "question_id": qid})
            if (i + k) % 11:
                annotations.append({"question_id": qid, "image_id": i,
                                    "multiple_choice_answer": f"answer {k}",
                                    "answers": [{"answer": f"answer {k}"}] * 10})
    questions.append({"question": "no image", "question_id": 99999})
    (root / "vqa_q.json").write_text(json.dumps({"questions": questions}))
    (root / "vqa_a.json").write_text(json.dumps({"annotations": annotations}))
    for f in range(3):  # img2dataset's parquet output: the images inside
        rows = []
        for i in range(400):
            ok = i % 37 != 5
            rows.append({"key": f"{f:05d}{i:04d}", "caption": f"photo {f} {i}" if i % 53 else "",
                         "jpg": _png(f * 7 + i % 90) if ok else None,
                         "status": "success" if ok else "failed_to_download",
                         "error_message": None if ok else "HTTP Error 404"})
        _parquet(root / f"pairs-{f}.parquet", rows)
    (root / "pairs-3.parquet").write_bytes(b"PAR1 not a parquet file")
    _parquet(root / "urls.parquet", [  # a URL list: fetched at build time
        {"url": f"{url}/{p}", "caption": f"fetched {k}"} for k, p in enumerate(
            [f"ok/{i}.png" for i in range(40)] + ["flaky/3", "flaky/4", "slow", "html",
                                                  "missing.png", "ok/7.png"])])
    yield root
    host.shutdown()


LAYOUTS = {
    "llava": lambda r: ["llava_instruct", r / "llava.json", "--image-root", r],
    "webdataset": lambda r: ["webdataset", *sorted(r.glob("*.tar"))],
    "vqav2": lambda r: ["vqav2", r / "vqa_q.json", r / "vqa_a.json", "--image-root", r,
                        "--image-pattern", "img/{image_id}.png", "--max-turns", "2"],
    "parquet": lambda r: ["parquet", *sorted(r.glob("*.parquet")), "--fetch-urls",
                          "--fetch-timeout", "0.5", "--fetch-retries", "1"],
}


def _convert(args, out: Path, *extra) -> dict:
    return convert_main([str(a) for a in args] + ["--out", str(out), "--no-progress",
                                                  "--shard-size", "256", *extra])


def _records(out: Path) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    got = []
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        reader = ArrayRecordReader(str(out / shard))
        got += reader.read_all()
        reader.close()
    return got


def _files(out: Path) -> dict[str, str]:
    """Every file of a build (the report aside) by name: its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and not p.name.startswith("report")}


@pytest.mark.parametrize("layout,duplicates", [
    pytest.param(k, "keep", marks=pytest.mark.e2e) for k in sorted(LAYOUTS) if k != "llava"]
    + [("llava", "keep"), pytest.param("llava", "drop", marks=pytest.mark.e2e)])
def test_beam_gives_the_in_process_records_byte_for_byte(raw, tmp_path, layout, duplicates):
    """Also the exact-duplicate images (the fixtures reuse images a lot): the same ones
    reported, or dropped as skips."""
    args = [*LAYOUTS[layout](raw), "--duplicate-images", duplicates]
    here = _convert(args, tmp_path / "here")
    beam = _convert(args, tmp_path / "beam", *TWO_WORKERS)
    assert here["inputs"] > 500 and here["skipped"]
    assert here["duplicate_images"]["count"] > 100
    assert ("duplicate_image" in here["skipped"]) == (duplicates == "drop")
    if layout == "parquet":  # the slow URL timed out twice, the flaky ones came on retry
        assert here["skipped"]["fetch_failed"] == 2 and here["skipped"]["corrupt_image"] == 1
        assert here["skipped"]["missing_image"] == 33  # failed downloads (3 x 11)
    for key in ("name", "settings", "inputs", "samples", "skipped", "skipped_examples",
                "duplicate_images"):
        assert beam[key] == here[key], key
    counted = beam["beam_counters"]  # Beam's own metrics say the same
    assert counted["inputs"] == here["inputs"] and counted["written"] == here["samples"]
    assert {k.split("/")[1]: v for k, v in counted.items() if k.startswith("skipped/")} \
        == here["skipped"]
    a, b = _records(tmp_path / "here"), _records(tmp_path / "beam")
    assert len(a) == here["samples"] and sorted(a) == sorted(b)
    ids = [decode(r)["id"] for r in b]
    assert len(set(ids)) == len(ids)  # every repeated input id kept under its own name
    index = [json.loads(x) for x in (tmp_path / "beam" / "index.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in index) == sorted(ids)
    here_index = [json.loads(x) for x in (tmp_path / "here" / "index.jsonl").read_text(
    ).splitlines()]
    drop = ("shard", "position")  # the files differ, the rest of each line is the same
    assert sorted(json.dumps({k: v for k, v in x.items() if k not in drop}) for x in index) \
        == sorted(json.dumps({k: v for k, v in x.items() if k not in drop}) for x in here_index)
    assert beam["runner"] == "DirectRunner"


@pytest.mark.e2e
def test_a_rerun_and_a_killed_run_give_the_same_output(raw, tmp_path):
    args = LAYOUTS["llava"](raw)
    _convert(args, tmp_path / "clean", *IN_MEMORY)
    clean = _files(tmp_path / "clean")
    _convert(args, tmp_path / "clean", *IN_MEMORY)  # again, into the same directory
    assert _files(tmp_path / "clean") == clean
    # killed while writing shards, then run again with the same command
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_pipelines.convert", *map(str, args), "--out", str(out),
           "--no-progress", "--shard-size", "256", *TWO_WORKERS]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.arrayrecord*")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # it died before finishing
    (out / "llava_instruct-00099.arrayrecord").write_bytes(b"a shard of an older run")
    _convert(args, out, *IN_MEMORY)
    assert _files(out) == clean


def test_beam_reads_from_and_writes_to_an_object_store(raw, tmp_path, monkeypatch):
    """URLs go through Beam's FileSystems (here a fake store registered as gs:// is with
    apache-beam[gcp]): tars and parquet files read from it, a LLaVA JSON's images under a
    store prefix, the shards, index and manifest written to it; the same records as the
    in-process build of the local copies."""
    import fake_store

    monkeypatch.setenv("MMJAX_FAKE_STORE", str(tmp_path / "store"))
    bucket = tmp_path / "store" / "bucket"
    (bucket / "in").mkdir(parents=True)
    for f in [*raw.glob("*.tar"), *raw.glob("pairs-*.parquet")]:
        (bucket / "in" / f.name).write_bytes(f.read_bytes())
    (bucket / "img").mkdir()
    for f in (raw / "img").iterdir():
        (bucket / "img" / f.name).write_bytes(f.read_bytes())
    url = "fakestore://bucket"
    cases = {
        "webdataset": (["webdataset", *sorted(raw.glob("*.tar"))],
                       ["webdataset", *[f"{url}/in/{t.name}" for t in sorted(raw.glob("*.tar"))]]),
        "parquet": (["parquet", *sorted(raw.glob("pairs-*.parquet"))],
                    ["parquet", *[f"{url}/in/{p.name}"
                                  for p in sorted(raw.glob("pairs-*.parquet"))]]),
        "llava": (["llava_instruct", raw / "llava.json", "--image-root", raw],
                  ["llava_instruct", raw / "llava.json", "--image-root", url]),
    }
    for name, (here_args, store_args) in cases.items():
        here = _convert(here_args, tmp_path / f"here-{name}")
        out = f"{url}/out-{name}"
        store = _convert(store_args, out, *IN_MEMORY)
        for key in ("inputs", "samples", "skipped", "duplicate_images"):
            assert store[key] == here[key], (name, key)
        got = Path(fake_store.local(out))
        assert sorted(_records(got)) == sorted(_records(tmp_path / f"here-{name}")), name
        assert json.loads((got / "manifest.json").read_text())["samples"] == here["samples"]
        assert not [p for p in got.rglob("*") if p.is_file() and ".beam-" in str(p)]
    with pytest.raises(BuildError, match="a Beam build"):  # in process: local only
        _convert(cases["llava"][0], f"{url}/in-process")


def test_input_ids_that_clash_with_renamed_ids_stop_the_build(raw, tmp_path):
    rec = {"id": "a", "image": "img/1.png", "conversations": _conv("yes")}
    mix = [rec, rec, dict(rec, id="a#1")]  # the second "a" is named a#1, as is the third
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    args = ["llava_instruct", tmp_path / "mix.json", "--image-root", raw]
    with pytest.raises(BuildError, match="a#1"):
        _convert(args, tmp_path / "beam", *IN_MEMORY)
    here = _convert(args, tmp_path / "here")  # in process: named in input order
    assert sorted(decode(r)["id"] for r in _records(tmp_path / "here")) == [
        "a", "a#1", "a#1#2"] and here["samples"] == 3


@pytest.mark.e2e
def test_mmjax_train_trains_on_the_beam_shards(demo_data, tmp_path):
    m = _convert(["llava_instruct", demo_data / "train_instruct.json", "--image-root",
                  demo_data], tmp_path / "shards", *TWO_WORKERS)
    assert m["samples"] == 96 and not m["skipped"]
    sources = [{"kind": "arrayrecord", "path": str(tmp_path / "shards" / "*.arrayrecord")}]
    c = configlib.load(f"{ROOT}/configs/stage2.py:demo", overrides(demo_data, 2, 2, [
        f"--config.data.sources={sources!r}"]))
    c.init.stage1_checkpoint = ""
    train(c, tmp_path / "work")
    lines = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().split(
        "\n") if x.strip()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(np.isfinite(losses))
