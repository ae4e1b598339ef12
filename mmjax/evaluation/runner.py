"""Answering a benchmark with the KV-cache engine (or through a server) and scoring it:
what `python -m mmjax.evaluate`, evaluation during training and the demo share.

    report = run(m, bench, out)     # m: inference.load.Loaded; bench: benchmarks.get(...)
    report = run(None, bench, out, engine=Endpoint("http://127.0.0.1:8000/v1"))

`answer` asks the questions not yet answered in `out/answers.jsonl` (LLaVA's answer layout,
appended batch by batch, so a killed run resumes), `run` scores them with the benchmark's
official metric and writes `results.json`, `results.md` and the submission files.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from mmjax.data.image import ImageError
from mmjax.evaluation import benchmarks as bench_lib
from mmjax.evaluation.endpoint import Endpoint, image_url
from mmjax.inference.load import Loaded
from mmjax.inference.prompt import request
from mmjax.inference.sampling import Sampling

PROMPTS = {"short_answer": bench_lib.SHORT, "multiple_choice": bench_lib.CHOICE,
           "vizwiz": bench_lib.UNANSWERABLE}


def _key(line: dict) -> str:
    r = line.get("round_id")
    return f"{line['question_id']}" if r is None else f"{line['question_id']}#{r}"


def read_answers(path: Path) -> dict[str, dict]:
    """Complete answer lines in `path` by key (a torn last line is cut off)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = {}
    for line in data[:end].decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[_key(rec)] = rec
    return out


def _asker(m: Loaded | None, engine, sampling: Sampling, blank_images: bool):
    """(prepare(item) -> what one question needs, ask(prepared list) -> reply texts) for a
    local engine or an `Endpoint`. prepare raises ImageError / OSError for an image that
    cannot be read."""
    if isinstance(engine, Endpoint):
        return (lambda it: (it.text, None if it.image is None else image_url(it.image)),
                lambda qs: engine.ask(qs, sampling.max_new_tokens))

    def prepare(it):
        images = [] if it.image is None else [m.pixels(it.image, blank_images)]
        return request(m, [(it.text, "")], images)

    return prepare, lambda reqs: [r.text for r in engine.generate(reqs, sampling)]


def answer(m: Loaded | None, engine, items, out: Path | None, batch_size: int,
           sampling: Sampling, skips, model_id: str, progress: bool = True,
           blank_images: bool = False) -> dict[str, dict]:
    """Answers the items not yet in `out` (appending batch by batch; None: no file) with a
    local `engine` over `m`, or through an `Endpoint` (m None); returns every answer line by
    item key. An image that does not decode is a skip ('unreadable_image')."""
    done = read_answers(out) if out is not None else {}
    todo = [it for it in items if it.key not in done]
    prepare, ask = _asker(m, engine, sampling, blank_images)
    t0, n = time.time(), 0
    with open(out if out is not None else os.devnull, "a") as f:
        for start in range(0, len(todo), batch_size):
            chunk, prepared = [], []
            for it in todo[start:start + batch_size]:
                try:
                    prepared.append(prepare(it))
                except (ImageError, OSError) as e:
                    skips.add("unreadable_image", f"{it.question_id}: {e}")
                    continue
                chunk.append(it)
            texts = ask(prepared) if prepared else []
            for it, text in zip(chunk, texts):
                line = {"question_id": it.question_id, "prompt": it.text,
                        "text": text.strip(), "answer_id": uuid.uuid4().hex,
                        "model_id": model_id, "metadata": {}, **it.fields}
                f.write(json.dumps(line) + "\n")
                done[it.key] = line
            f.flush()
            if out is not None:
                os.fsync(f.fileno())
            n += len(todo[start:start + batch_size])
            if progress:
                print(f"\r{n}/{len(todo)} questions, {n / (time.time() - t0):.2f}/s", end="",
                      file=sys.stderr, flush=True)
    if progress and todo:
        print(file=sys.stderr)
    return done


def limit_items(items, limit: int):
    """The first `limit` questions (all rotations of an MMBench question count as one)."""
    if not limit:
        return items
    keep, out = set(), []
    for it in items:
        if it.question_id not in keep:
            if len(keep) == limit:
                continue
            keep.add(it.question_id)
        out.append(it)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(m: Loaded | None, bench: bench_lib.Benchmark, out: Path | None, *, batch_size: int = 16,
        limit: int = 0, max_new_tokens: int | None = None, engine=None, model_source: str = "",
        progress: bool = True, items=None, blank_images: bool = False) -> dict:
    """Reads (unless `items` are given), answers, scores and writes the report of one
    benchmark into `out` (None: nothing written); returns the report, with the answer
    texts of the scored items under 'answers'. `engine`: a local engine over `m` (default:
    m's), or an `Endpoint` (m None: the server's model answers)."""
    t0 = time.time()
    items = limit_items(bench.read(), limit) if items is None else items
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    remote = isinstance(engine, Endpoint)
    if remote and blank_images:
        raise ValueError("blank images are a local model's baseline: not through an endpoint")
    engine = engine or m.engine()
    sampling = Sampling(max_new_tokens=max_new_tokens or bench.max_new_tokens)
    model = ({"id": engine.model, "source": engine.base, "template": "the server's",
              "dtype": None} if remote else
             {"id": m.model_id, "source": model_source, "template": m.template,
              "dtype": str(m.model.rt.dtype)})
    lines = answer(m, engine, items, out / "answers.jsonl" if out is not None else None,
                   batch_size, sampling, bench.skips, model["id"], progress, blank_images)
    answered = [it for it in items if it.key in lines]
    texts = [lines[it.key]["text"] for it in answered]
    metrics = bench.score(answered, texts) if bench.scored and answered else {}
    files = bench.submission(answered, texts, out) if answered and out is not None else []
    report = {
        "benchmark": bench.name, "split": bench.split, "variant": bench.variant,
        "blank_images": blank_images,
        "model": model,
        "questions": len({it.question_id for it in items}), "answer_lines": len(answered),
        "skipped": bench.skips.total, "skipped_by_reason": bench.skips.as_dict(),
        "limit": limit, "metrics": metrics,
        "prompts": {**{k: v for k, v in PROMPTS.items()},
                    "example": items[0].text if items else ""},
        "max_new_tokens": sampling.max_new_tokens, "greedy": True,
        "data_files": {str(p.relative_to(bench.data) if p.is_relative_to(bench.data) else p):
                       sha256(p) for p in bench.files},
        "submission_files": [p.name for p in files], "seconds": round(time.time() - t0, 1),
    }
    if out is not None:
        (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "results.md").write_text(markdown(report))
    return dict(report, answers=list(zip(answered, texts)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown(report: dict) -> str:
    head = (f"## {report['benchmark']}" + (f" {report['split']}" if report["split"] else "")
            + (f" ({report['variant']})" if report["variant"] else "")
            + (" [blank images]" if report.get("blank_images") else "")
            + f": {report['model']['id']}\n\n")
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {_fmt(v)} |" for k, v in report["metrics"].items()]
    rows += [f"| questions | {report['questions']} |",
             f"| skipped | {report['skipped']} |"]
    return head + "\n".join(rows) + "\n"


def compare(a: Path, b: Path) -> str:
    """The metrics of two results.json side by side."""
    ra, rb = (json.loads(Path(p).read_text()) for p in (a, b))
    names = list(dict.fromkeys([*ra["metrics"], *rb["metrics"]]))
    rows = [f"| metric | {ra['model']['id']} | {rb['model']['id']} | difference |",
            "|---|---|---|---|"]
    for k in names:
        va, vb = ra["metrics"].get(k), rb["metrics"].get(k)
        diff = _fmt(vb - va) if isinstance(va, (int, float)) and isinstance(
            vb, (int, float)) else ""
        rows.append(f"| {k} | {_fmt(va) if va is not None else '-'} | "
                    f"{_fmt(vb) if vb is not None else '-'} | {diff} |")
    for k in ("questions", "skipped"):
        rows.append(f"| {k} | {ra[k]} | {rb[k]} | |")
    title = f"{ra['benchmark']} {ra['split']}".strip()
    if (ra["benchmark"], ra["split"]) != (rb["benchmark"], rb["split"]):
        title += f" vs {rb['benchmark']} {rb['split']}".rstrip()
    return f"## {title}\n\n" + "\n".join(rows) + "\n"


