"""Batch answers for a question file, in LLaVA's layouts.

    python -m mmjax.predict (--hf DIR | --checkpoint WORKDIR[:STEP]) --questions Q.jsonl
        --image-root DIR --out A.jsonl [--batch-size 16] [--max-new-tokens 128] ...

Questions: one JSON object per line with `question_id`, `image` (relative to --image-root;
absent for text-only questions; a list for several, any-resolution models), or `video`
(LLaVA-OneVision, frames as --frames / --video-fps sample them), `text` (the question as the
model is asked it, format prompt included) and optionally `category`. Answers: one line
per question with `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata` (LLaVA's
model_vqa_loader layout). Resumable: questions already answered in --out are skipped, and
answers are appended batch by batch, so a killed run loses at most one batch. With several
processes (jax.distributed), each answers its share into A.jsonl.partK and process 0 merges.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from mmjax.errors import UsageError
from mmjax.inference import cli
from mmjax.inference.prompt import request


def read_questions(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"question file {path} does not exist")
    out, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not JSON ({e.msg})") from None
        if "question_id" not in q or "text" not in q:
            raise UsageError(f"{path}:{n}: needs question_id and text")
        if q["question_id"] in seen:
            raise UsageError(f"{path}:{n}: question_id {q['question_id']!r} repeats")
        seen.add(q["question_id"])
        out.append(q)
    return out


def answered(path: Path) -> set:
    """Question ids with a complete answer line in `path`; a torn last line (a run killed
    while writing) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    ids = set()
    for line in data[:end].decode().splitlines():
        if line.strip():
            ids.add(json.loads(line)["question_id"])
    return ids


def merge(out: Path, parts: list[Path]) -> None:
    """Appends the parts' answers not yet in `out`, then removes the parts."""
    have = answered(out)
    with open(out, "a") as f:
        for p in parts:
            if not p.exists():
                continue
            answered(p)
            for line in p.read_text().splitlines():
                if line.strip() and json.loads(line)["question_id"] not in have:
                    have.add(json.loads(line)["question_id"])
                    f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    for p in parts:
        p.unlink(missing_ok=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mmjax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--image-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model-id", default=None, help="default: the model's directory name")
    cli.add_video_args(parser, paths="none")
    cli.add_sampling_args(parser, max_new=128)
    args = parser.parse_args(argv)
    sampling = cli.sampling(args)
    questions = read_questions(args.questions)
    pid, nproc = jax.process_index(), jax.process_count()
    target = args.out if nproc == 1 else args.out.with_name(f"{args.out.name}.part{pid}")
    parts = [args.out.with_name(f"{args.out.name}.part{k}") for k in range(nproc)]
    done = answered(args.out) | set().union(*(answered(p) for p in parts))
    todo = [q for q in questions if q["question_id"] not in done][pid::nproc]
    m = cli.load_model(args)
    engine = m.engine(cli.say_compiling)
    model_id = args.model_id or m.model_id
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0, n_done = time.time(), 0
    with open(target, "a") as f:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            reqs = []
            for q in chunk:
                named = q.get("image") or []
                images = [m.read_image(args.image_root / n)
                          for n in (named if isinstance(named, list) else [named])]
                videos = [m.read_video(args.image_root / q["video"], args.frames,
                                       args.video_fps)] if q.get("video") else []
                reqs.append(request(m, [(q["text"], "")], images, videos=videos))
            key = jax.random.fold_in(jax.random.key(args.seed), start)
            results = engine.generate(reqs, sampling, seed=key)
            for q, r in zip(chunk, results):
                f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                                    "text": r.text.strip(), "answer_id": uuid.uuid4().hex,
                                    "model_id": model_id, "metadata": {}}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            n_done += len(chunk)
            rate = n_done / (time.time() - t0)
            print(f"\r{n_done}/{len(todo)} questions, {rate:.2f} questions/s", end="",
                  file=sys.stderr, flush=True)
    if todo:
        print(file=sys.stderr)
    if nproc > 1:
        multihost_utils.sync_global_devices("mmjax.predict answered")
        if pid == 0:
            merge(args.out, parts)
    print(f"{len(todo)} answered, {len(done)} already in {args.out}", file=sys.stderr)
    return {"answered": len(todo), "skipped": len(done), "out": str(args.out)}


if __name__ == "__main__":
    cli.run_main(main)
