"""Self-instruct generation: image contexts x kinds -> chat requests -> LLaVA conversations.

    OUT/responses.jsonl   one line per finished request: {job, image_id, image, kind, content,
                          finish_reason}; appended as replies arrive, so an interrupted run
                          resumes with the jobs that have no line yet
    OUT/cache/            replies by request hash (a rerun with the same prompts costs nothing)
    OUT/llava.json        the accepted conversations in LLaVA form, in job order
    OUT/rejected.jsonl    the replies that were dropped, with the reason
    OUT/summary.json      counts: jobs, requests made, cached, failed, accepted, rejected by reason

`run` asks from a thread pool in this process; `run_beam` spreads the same jobs over Apache
Beam's workers (`--runner` on the command), with the same outputs.

A job is (image, kind); its id is `IMAGEID_KIND`. Jobs whose requests still fail after the
retries are counted as failed and left without a line, so the next run tries them again.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from data_pipelines.self_instruct.client import ChatClient, ClientConfig, RequestFailed
from data_pipelines.self_instruct.parse import Rejected, parse
from data_pipelines.self_instruct.prompts import load_prompt, render_context

log = logging.getLogger("data_pipelines.self_instruct")


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    image_id: str
    image: str
    kind: str
    messages: tuple


def make_jobs(contexts: list[dict], kinds: list[str], prompt_dir=None, n_instructions: int = 5
              ) -> list[Job]:
    prompts = {k: load_prompt(k, prompt_dir) for k in kinds}
    jobs = []
    for ctx in contexts:
        for kind in kinds:
            fields = {"n": n_instructions} if kind == "multitask" else {}
            msgs = prompts[kind].messages(render_context(ctx, kind), **fields)
            jobs.append(Job(f"{ctx['image_id']}_{kind}", str(ctx["image_id"]), ctx["file_name"],
                            kind, tuple(tuple(sorted(m.items())) for m in msgs)))
    return jobs


def _finished(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["job"]] = rec
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that job runs again
    return done


def run(jobs: list[Job], client_cfg: ClientConfig, out: Path, concurrency: int = 8,
        progress=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not client_cfg.cache_dir:
        client_cfg = dataclasses.replace(client_cfg, cache_dir=str(out / "cache"))
    client = ChatClient(client_cfg)
    responses = out / "responses.jsonl"
    done = _finished(responses)
    todo = [j for j in jobs if j.id not in done]
    counts = collections.Counter(jobs=len(jobs), resumed=len(done))
    failures = []
    with open(responses, "a", encoding="utf-8") as f, \
            cf.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(client.complete, [dict(m) for m in job.messages]): job
                   for job in todo}
        it = cf.as_completed(futures)
        if progress is not None:
            it = progress(it, total=len(futures))
        for fut in it:
            job = futures[fut]
            try:
                reply = fut.result()
            except RequestFailed as e:
                counts["failed"] += 1
                failures.append(f"{job.id}: {e}")
                continue
            counts["cached" if reply.cached else "requested"] += 1
            rec = {"job": job.id, "image_id": job.image_id, "image": job.image, "kind": job.kind,
                   "content": reply.content, "finish_reason": reply.finish_reason}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    counts["http_requests"] = client.requests
    summary = collect(jobs, out)
    summary.update({k: v for k, v in counts.items()})
    summary["failures"] = failures[:20]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


BEAM_PARTS = ".beam-responses"  # replies per bundle, joined into responses.jsonl at the end


def run_beam(jobs: list[Job], client_cfg: ClientConfig, out: Path, concurrency: int,
             pipeline_args: list[str]) -> dict:
    """`run` on Apache Beam: the jobs not answered yet spread over the workers in batches,
    each batch asked with `concurrency` requests in flight (per worker), through the same
    client (retries with backoff, the reply cache in OUT/cache: a rerun asks nothing twice).
    Replies land in per-bundle files, joined into responses.jsonl; then `collect` parses
    them as `run` does. Same outputs and summary as `run`."""
    # the beam extra, imported when asked for: the rest of self-instruct needs none
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not client_cfg.cache_dir:
        client_cfg = dataclasses.replace(client_cfg, cache_dir=str(out / "cache"))
    _join_parts(out)  # a killed run's replies first
    done = _finished(out / "responses.jsonl")
    todo = [j for j in jobs if j.id not in done]
    tally_path = out / ".beam-tally.json"
    tally_path.unlink(missing_ok=True)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    if todo:
        with beam.Pipeline(options=PipelineOptions(pipeline_args)) as p:
            (p | "jobs" >> beam.Create(todo) | "spread" >> beam.Reshuffle()
             | "batches" >> beam.BatchElements(min_batch_size=1,
                                               max_batch_size=max(1, 4 * concurrency))
             | "ask" >> beam.Map(_ask_batch, client_cfg, concurrency, str(out / BEAM_PARTS))
             | "tally" >> beam.CombineGlobally(_add_tallies)
             | "save tally" >> beam.Map(_save_tally, str(tally_path)))
    _join_parts(out)
    tally = json.loads(tally_path.read_text()) if tally_path.exists() else {}
    tally_path.unlink(missing_ok=True)
    summary = collect(jobs, out)
    summary.update({"jobs": len(jobs), "resumed": len(done),
                    **{k: v for k, v in tally.items() if k != "failures"}})
    summary["failures"] = tally.get("failures", [])[:20]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _ask_batch(batch: list[Job], cfg: ClientConfig, concurrency: int, parts: str) -> dict:
    """One batch of jobs asked (`concurrency` at once); the replies written to a new part
    file; returns the batch's tally."""
    client = ChatClient(cfg)
    tally = collections.Counter()
    failures, lines = [], []

    def ask(job):
        try:
            return job, client.complete([dict(m) for m in job.messages]), None
        except RequestFailed as e:
            return job, None, f"{job.id}: {e}"

    with cf.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for job, reply, failure in pool.map(ask, batch):
            if failure is not None:
                tally["failed"] += 1
                failures.append(failure)
                continue
            tally["cached" if reply.cached else "requested"] += 1
            lines.append(json.dumps({"job": job.id, "image_id": job.image_id,
                                     "image": job.image, "kind": job.kind,
                                     "content": reply.content,
                                     "finish_reason": reply.finish_reason},
                                    ensure_ascii=False) + "\n")
    if lines:
        Path(parts).mkdir(parents=True, exist_ok=True)
        name = Path(parts) / f"{uuid.uuid4().hex}.jsonl"
        tmp = name.with_suffix(".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, name)
    tally["http_requests"] += client.requests
    return {**tally, "failures": failures}


def _add_tallies(tallies) -> dict:
    total = collections.Counter()
    failures: list[str] = []
    for t in tallies:
        failures += t.get("failures", [])
        total.update({k: v for k, v in t.items() if k != "failures"})
    return {**total, "failures": sorted(failures)[:20]}


def _save_tally(tally: dict, path: str) -> None:
    Path(path).write_text(json.dumps(tally))


def _join_parts(out: Path) -> None:
    """The per-bundle reply files appended to responses.jsonl (jobs not there yet), then
    removed."""
    parts = out / BEAM_PARTS
    if not parts.is_dir():
        return
    done = _finished(out / "responses.jsonl")
    with open(out / "responses.jsonl", "a", encoding="utf-8") as f:
        for part in sorted(parts.glob("*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if rec["job"] not in done:
                    done[rec["job"]] = rec
                    f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(parts)


def collect(jobs: list[Job], out: Path) -> dict:
    """Parses every finished reply, writes llava.json (job order) and rejected.jsonl."""
    done = _finished(out / "responses.jsonl")
    accepted, rejected = [], []
    reasons = collections.Counter()
    for job in jobs:
        rec = done.get(job.id)
        if rec is None:
            continue
        try:
            turns = parse(job.kind, rec["content"], rec["finish_reason"], job.id)
        except Rejected as e:
            reasons[e.reason] += 1
            rejected.append({"job": job.id, "reason": e.reason, "detail": e.detail})
            continue
        accepted.append({"id": job.id, "image": job.image, "conversations": turns,
                         "source": f"self_instruct/{job.kind}"})
    (out / "llava.json").write_text(json.dumps(accepted, ensure_ascii=False, indent=1))
    with open(out / "rejected.jsonl", "w", encoding="utf-8") as f:
        for r in rejected:
            f.write(json.dumps(r) + "\n")
    return {"finished": len(done), "accepted": len(accepted), "rejected": dict(reasons),
            "missing": sum(1 for j in jobs if j.id not in done)}
