"""One run per work dir: the lock, the resumed config's check, logs cut back on resume.

- `WorkdirLock`: `WORKDIR/lock` holds host, pid and start time under an exclusive `flock`
  (released by the kernel when the process dies, SIGKILL included). A second run on the same
  dir is refused naming the first; a lock file left by a dead process is taken over with a
  notice. Only process 0 of a multi-process run takes it.
- `config_changes`: a resume whose config differs from the saved `config.json` in anything
  but the fields meant to change between launches is refused unless allowed.
- `truncate_logs`: `metrics.jsonl` and `samples.jsonl` lose the records past the restored
  step, so a step replayed after a resume appears once.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from mmjax.errors import ConfigError

# Fields a resumed run may change: how long it runs, what it logs, evaluates and profiles,
# where checkpoints and metrics go, how the processes find each other. Anything else (model, data,
# batch, optimizer, seed, workers: the data position depends on the worker count) changes
# what the run computes.
RESUME_MAY_CHANGE = ("total_steps", "num_epochs", "log_every", "log_sample_ids",
                     "compile_cache_dir",
                     "max_skipped_in_a_row", "metrics.", "profile.", "checkpoint.",
                     "distributed.", "eval.")


class WorkdirLocked(RuntimeError):
    """Another live run holds the work dir."""


class WorkdirLock:
    def __init__(self, workdir: Path, log=print):
        self.path = Path(workdir) / "lock"
        self._fd = None
        self._log = log

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise WorkdirLocked(
                f"{self.path.parent} is in use by another run ({_describe(holder)}); wait for "
                "it to end or use another --workdir") from None
        previous = _read(fd)
        if previous:
            self._log(f"taking over the lock of a run that is no longer alive "
                      f"({_describe(previous)})")
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: the run ended cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read(fd) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "no details recorded"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _flatten(node, prefix="") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_changes(saved: dict, current: dict) -> list[str]:
    """'field: saved -> now' for every field that differs and may not change on resume."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_MAY_CHANGE):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def check_resume_config(workdir: Path, current: dict, step: int, allow: bool, log=print) -> None:
    """Refuses (ConfigError) a resume whose config changed beyond RESUME_MAY_CHANGE, unless
    `allow`; then the old config is kept as config.step{STEP}.json."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return
    changes = config_changes(json.loads(path.read_text()), current)
    if not changes:
        return
    if not allow:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8
                                           else "")
        raise ConfigError(f"{workdir} holds a run (checkpoint step {step}) with another config: "
                          f"{shown}. Resume with the saved settings, use another --workdir, or "
                          "pass --allow-config-change")
    backup = path.with_name(f"config.step{step}.json")
    backup.write_text(path.read_text())
    log(f"resuming with a changed config ({len(changes)} field(s): {'; '.join(changes[:3])}"
        f"{'; ...' if len(changes) > 3 else ''}); the previous one is in {backup.name}")


def truncate_logs(workdir: Path, step: int) -> None:
    """Drops records past `step` from the work dir's JSONL logs (a torn last line too)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(workdir) / name
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if int(rec.get("step", 0)) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
