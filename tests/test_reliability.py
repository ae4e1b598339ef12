"""Runs that cannot be silently poisoned, on the demo model: a corrupted newest checkpoint
falls back to the older one and the losses continue bitwise; all-bad data stops in bounded
time; a killed run leaves no Grain worker; one run per work dir; a changed config is refused
on resume; logs hold each step once after kills; user mistakes are one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runs import ROOT
from runs import cmd as _cmd
from runs import env as _env
from runs import overrides as _overrides
from runs import train as run_train
from test_train_ops import _tensorboard_scalars

from mmjax import configlib
from mmjax.errors import ConfigError
from mmjax.training.config import check_batch_fits_mesh, from_config


def _cli(workdir, data, steps, extra=(), timeout=600):
    return subprocess.run(_cmd(workdir, data, steps, extra), env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _steps(workdir, name):
    return [json.loads(x)["step"] for x in (workdir / name).read_text().splitlines()]


def _losses(history):
    return dict(history["loss"])


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: -p.stat().st_size)


def _flip_bit(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def _digit_after(path: Path, key: str) -> int:
    """The offset of the first digit after `key` in a JSON file (flipping its lowest bit
    leaves a digit: the file stays valid JSON, only the value changes)."""
    text = path.read_bytes()
    at = text.index(key.encode()) + len(key)
    while not chr(text[at]).isdigit():
        at += 1
    return at


def _samples(workdir) -> dict:
    return {json.loads(x)["step"]: json.loads(x)["ids"]
            for x in (workdir / "samples.jsonl").read_text().splitlines()}


# one damage to the newest checkpoint (step 10) each: (what, how, what the message says)
DAMAGES = [
    ("one bit of the largest array data file",
     lambda d: _flip_bit(_data_files(d)[0], _data_files(d)[0].stat().st_size // 2),
     "unreadable|differ from the checksums"),
    ("one bit of the data position",
     lambda d: _flip_bit(d / "data_iter" / "process_0-of-1.json",
                         _digit_after(d / "data_iter" / "process_0-of-1.json", "index")),
     "process_0-of-1.json \\(the data position\\) changed after it was written"),
    ("one bit of the meta item (the worker count)",
     lambda d: _flip_bit(d / "meta" / "metadata", _digit_after(d / "meta" / "metadata",
                                                                "data_workers")),
     "meta/metadata changed after it was written"),
    ("the largest array data file truncated",
     lambda d: _data_files(d)[0].write_bytes(
         _data_files(d)[0].read_bytes()[: _data_files(d)[0].stat().st_size // 3]),
     "is truncated \\(\\d+ of \\d+ bytes\\)"),
]


@pytest.mark.e2e
def test_damaged_newest_checkpoint_falls_back_and_the_run_continues_bitwise(
        demo_data, tmp_path, capsys):
    """Each item of a checkpoint damaged in turn (an array chunk, the data position, meta,
    a truncated file): detected, named in one line, moved aside; the run falls back to the
    older checkpoint and replays the uninterrupted run's losses and sample ids bitwise."""
    import re

    run = lambda d, extra=(): run_train(configlib.load(  # noqa: E731
        f"{ROOT}/configs/stage1.py:demo",
        _overrides(demo_data, 1, 10, ["--config.log_sample_ids=True", *extra])), d,
        allow_config_change=bool(extra))
    work = tmp_path / "run"
    reference = _losses(run(work))  # CPU steps are deterministic: the reference losses
    ids = _samples(work)
    ckpts = work / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [8, 10]
    for n, (what, damage, said) in enumerate(DAMAGES):
        damage(ckpts / "10")
        capsys.readouterr()
        again = _losses(run(work))
        captured = capsys.readouterr()
        out = captured.out
        lines = [x for x in out.splitlines() if "checkpoint step 10" in x]
        assert len(lines) == 1 and "is not usable" in lines[0], (what, out[-2000:])
        assert re.search(said, lines[0]), (what, lines[0])
        assert "falling back to step 8" in lines[0] and "resumed from" in out, what
        noise = re.search(r"tensorstore|driver|Traceback|WARNING|absl", out + captured.err)
        assert not noise, (what, out[-1000:], captured.err[-1000:])
        assert len(list((work / "corrupt_checkpoints").iterdir())) == n + 1, what
        assert again == {9: reference[9], 10: reference[10]}, what  # bitwise
        assert _samples(work) == ids, what  # the same samples, in the same order
    # metrics.jsonl holds each step once after the replays
    assert _steps(work, "metrics.jsonl") == list(range(1, 11))

    # strict mode stops instead of falling back
    target = _data_files(ckpts / "10")[0]
    target.unlink()
    from mmjax.training.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"checkpoint step 10 .* not usable: .* is "
                                              r"missing\. Stopping"):
        run(work, ["--config.checkpoint.strict_restore=True"])


def test_checksums_catch_a_changed_value_and_refuse_non_finite_state():
    import jax.numpy as jnp

    from mmjax.training.checkpoint import _verify, checksums

    state = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
             "b": jnp.ones((5,), jnp.bfloat16), "n": jnp.int32(7)}
    sums, finite = checksums(state)
    recorded = {k: [int(x) for x in v] for k, v in sums.items()}
    assert bool(finite) and _verify(state, recorded) is None
    flipped = dict(state, b=state["b"].at[3].set(1.0078125))  # one bit of one bf16 value
    assert "1 of 3 arrays differ" in _verify(flipped, recorded) and "['b']" in _verify(
        flipped, recorded)
    swapped = dict(state, a=state["a"][::-1])  # the same values in another order
    assert "['a']" in _verify(swapped, recorded)
    nan = dict(state, a=state["a"].at[0, 0].set(jnp.nan))
    assert not bool(checksums(nan)[1])


@pytest.mark.e2e
def test_all_bad_data_stops_in_bounded_time_and_sigterm_ends_a_wait(demo_data, tmp_path):
    nowhere = tmp_path / "no_images"
    nowhere.mkdir()
    sources = [{"kind": "llava_json", "path": str(demo_data / "train_captions.json"),
                "image_root": str(nowhere), "weight": 1.0}]
    # the bad share is checked on the samples read (no batch ever arrives)
    r = _cli(tmp_path / "bad", demo_data, 4, [f"--config.data.sources={sources!r}"],
             timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr[-2000:]
    assert "200 of 200 samples (100.0%) were skipped" in errors[0]
    assert "missing_image 200 (e.g. train-cap-" in errors[0]
    # with any share allowed, 2000 bad samples in a row and none good stop the run
    t = time.time()
    r = _cli(tmp_path / "stall", demo_data, 4, [f"--config.data.sources={sources!r}",
                                                "--config.data.max_bad_share=1.0"],
             timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr[-2000:]
    assert "2000 samples in a row were skipped and none was usable" in errors[0]
    assert "missing_image 2000 (e.g." in errors[0] and "Traceback" not in r.stderr
    assert time.time() - t < 120

    # with the stall check and the share check off it would wait forever: SIGTERM ends it
    proc = subprocess.Popen(_cmd(tmp_path / "wait", demo_data, 4, [
        f"--config.data.sources={sources!r}", "--config.data.max_bad_in_a_row=0",
        "--config.data.max_bad_share=1.0"]), env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "wait" / "config.json").exists():
        time.sleep(0.2)
    time.sleep(8)  # compiled and spinning on the bad samples
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    assert "SIGTERM while waiting for the data of step 1" in out


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:  # a thread may end between the listing and the read
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _start_and_kill(workdir, data, steps, at_least, extra, check=None):
    proc = subprocess.Popen(_cmd(workdir, data, steps, extra), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()] \
            if (workdir / "checkpoints").exists() else []
        if done and max(done) >= at_least:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGSTOP)  # held mid-run (its lock, its workers) until the kill
    if check is not None:
        check(proc)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return children


def _per_step(workdir):
    return {r["step"]: (r["loss"], r["ids"]) for r in map(
        json.loads, (workdir / "samples.jsonl").read_text().splitlines())}


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_kills_with_workers_lock_config_and_logs(demo_data, tmp_path):
    """Two SIGKILLs of a run with Grain workers, then a resume: the same losses and samples
    as an uninterrupted run, bitwise; each step logged once; no worker left behind."""
    work = tmp_path / "run"
    extra = ["--config.data.workers=2", "--config.log_sample_ids=True"]
    full = _cli(tmp_path / "full", demo_data, 12, extra)
    assert full.returncode == 0, full.stderr[-2000:]

    def second_run_refused(_proc):
        r = _cli(work, demo_data, 12, extra, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"error: {work} is in use by another run (host " in r.stderr

    children = _start_and_kill(work, demo_data, 12, 4, extra, second_run_refused)
    assert len(children) >= 2  # the Grain workers (and the resource tracker)
    time.sleep(1)
    assert [c for c in children if _alive(c)] == []

    _start_and_kill(work, demo_data, 12, 8, extra)  # takes over the stale lock, resumes
    # another worker count or seed on resume: refused in one line, naming the difference
    r = _cli(work, demo_data, 12, ["--config.data.workers=1", "--config.log_sample_ids=True"],
             timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.workers: 2 -> 1" in r.stderr and "--allow-config-change" in r.stderr
    assert "taking over the lock of a run that is no longer alive (host " in r.stdout
    # a change that the run's numbers do not depend on (no bad data here), allowed
    r = _cli(work, demo_data, 12, extra + ["--config.data.max_bad_share=0.5",
                                           "--allow-config-change"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resuming with a changed config (1 field(s): data.max_bad_share: 0.0 -> 0.5)"
            in r.stdout)
    assert list(work.glob("config.step*.json"))
    assert _steps(work, "metrics.jsonl") == list(range(1, 13))
    assert _steps(work, "samples.jsonl") == list(range(1, 13))
    assert _per_step(work) == _per_step(tmp_path / "full")  # bitwise on CPU
    # TensorBoard: each resume purges from its first step (as TensorBoard reads purge_step)
    loss = dict(_tensorboard_purged(work / "tensorboard")["loss"])
    assert sorted(loss) == list(range(1, 13))
    metrics = {json.loads(x)["step"]: json.loads(x)["loss"]
               for x in (work / "metrics.jsonl").read_text().splitlines()}
    np.testing.assert_allclose([loss[s] for s in range(1, 13)],
                               [metrics[s] for s in range(1, 13)], rtol=1e-6)


def _tensorboard_purged(directory):
    """Scalars as TensorBoard shows them: a file starting with a SessionLog START at step P
    drops the earlier files' events at steps >= P."""
    from tensorboardX.proto import event_pb2

    files = sorted(directory.glob("events.out.tfevents.*"),
                   key=lambda p: (int(p.name.split(".")[3]), p.name))
    tags: dict = {}
    for path in files:
        for rec in _records(path):
            event = event_pb2.Event.FromString(rec)
            if event.HasField("session_log") and event.session_log.status == 1:
                tags = {t: [(s, v) for s, v in vals if s < event.step]
                        for t, vals in tags.items()}
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    assert _tensorboard_scalars(directory)  # the plain reader sees the same files
    return tags


def _records(path):
    import struct

    data = path.read_bytes()
    i = 0
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        yield data[i + 12:i + 12 + n]
        i += 12 + n + 4


@pytest.mark.e2e
def test_user_mistakes_are_one_line(demo_data, tmp_path):
    cases = {
        "batch": (["--config.batch_size=15", "--config.grad_accum=1"],
                  "batch_size 15 / grad_accum 1 does not split"),
        "batch_auto": (["--config.batch_size=15"], "batch_size 15 does not split into "
                       "micro-batches over the 8 devices the batch is sharded on (grad_accum "
                       "0: auto); use a multiple of 8, e.g. --config.batch_size=16"),
        "path": ([f"--config.tokenizer={tmp_path / 'nope'}"], "tokenizer: "),
        "field": (["--config.data.nope=1"], "unknown config field 'data.nope'"),
    }
    for name, (extra, message) in cases.items():
        r = _cli(tmp_path / name, demo_data, 2, extra, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip() and "WARNING" not in x]
        assert r.returncode == 2, (name, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (name, lines)
    r = subprocess.run([sys.executable, "-m", "mmjax.train", "--config",
                        f"{ROOT}/configs/stage1.py:nosuch", "--workdir", str(tmp_path / "v")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no variant 'nosuch'"), \
        r.stderr[-2000:]
    r = _cli(tmp_path / "debug", demo_data, 2, ["--config.batch_size=15", "--debug"],
             timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_checked_at_start_without_compiling(demo_data):
    c = from_config(configlib.load(f"{ROOT}/configs/stage1.py:demo", _overrides(
        demo_data, 1, 2, ["--config.batch_size=12", "--config.grad_accum=4"])))
    from mmjax.sharding import make_mesh

    with pytest.raises(ConfigError, match="use a multiple of 32"):
        check_batch_fits_mesh(c, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    check_batch_fits_mesh(c, make_mesh({"data": 1, "fsdp": 1, "tensor": 8}))


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_failed_save_stops_the_run_in_one_line(demo_data, tmp_path):
    import resource

    def small_files():  # writes past 1 MB fail (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    work = tmp_path / "full"
    r = subprocess.run(_cmd(work, demo_data, 10), env=_env(), capture_output=True, text=True,
                       timeout=600, preexec_fn=small_files)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: saving the checkpoint of step "), \
        r.stderr[-3000:]
    assert "File too large" in lines[0]
    finished = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    if "no earlier checkpoint of this run" in lines[0]:  # the first save failed
        assert finished == []
    else:  # a later one: the one before it is named and still there
        assert finished and lines[0].endswith(f"the newest intact checkpoint is step "
                                              f"{finished[-1]}")
    done = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert max(done) < 10  # stopped, not trained on


def test_no_save_inside_a_non_finite_streak_nor_of_non_finite_state(tmp_path, capsys):
    import types

    import jax.numpy as jnp

    from mmjax.training import loop
    from mmjax.training.checkpoint import CheckpointConfig, Checkpointer, NonFiniteState

    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_interval=1, keep_last=1,
                                                            async_save=False))
    good = {"w": jnp.ones((4,)), "skipped_in_a_row": jnp.int32(0)}
    assert ckpt.save(1, good, force=True)
    with pytest.raises(NonFiniteState, match="step 2: the parameters hold NaN"):
        ckpt.save(2, {"w": jnp.full((4,), jnp.nan), "skipped_in_a_row": jnp.int32(0)})
    ckpt.wait()
    assert ckpt.intact == 1 and ckpt.manager.all_steps() == [1]

    state = types.SimpleNamespace(skipped_in_a_row=jnp.int32(2))  # the loop reads only this
    run = types.SimpleNamespace(checkpointer=ckpt, data=None,
                                settings=loop.Settings(total_steps=10, max_skipped_in_a_row=5))
    loop._save_unless_skipping(run, state, 3, force=False)  # deferred: keep_last=1 keeps 1
    assert "step 3: checkpoint deferred, the last 2 step(s) were skipped" in \
        capsys.readouterr().out
    state.skipped_in_a_row = jnp.int32(5)
    with pytest.raises(loop.NonFiniteStop, match=r"step 4: 5 steps in a row .* stopping "
                       r"without saving \(the newest intact checkpoint, step 1,"):
        loop._save_unless_skipping(run, state, 4, force=False)
    assert ckpt.manager.all_steps() == [1]
    ckpt.close()
