"""Self-instruct generation: image contexts x kinds -> chat requests -> LLaVA conversations.

    OUT/responses.jsonl   one line per finished request: {job, image_id, image, kind, content,
                          finish_reason}; appended as replies arrive, so an interrupted run
                          resumes with the jobs that have no line yet
    OUT/cache/            replies by request hash (a rerun with the same prompts costs nothing)
    OUT/llava.json        the accepted conversations in LLaVA form, in job order
    OUT/rejected.jsonl    the replies that were dropped, with the reason
    OUT/summary.json      counts: jobs, requests made, cached, failed, accepted, rejected by reason

A job is (image, kind); its id is `IMAGEID_KIND`. Jobs whose requests still fail after the
retries are counted as failed and left without a line, so the next run tries them again.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
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
