"""The training loop: steps, metrics, checkpoints, profiling and preemption.

    history = run(Loop(step_fn=..., data=..., ...), state)   # {'loss', 'state', 'preempted'}

`Loop` holds the parts `mmjax.training.run` built (the jitted step, the data iterator, the
checkpointer, the metric writer) and the few settings the loop reads. Device metrics are
fetched only every `log_every` steps, so the loop never waits on the device in between.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import batch as batch_format
from mmjax.data.pipeline import skip_report
from mmjax.data.quality import SkipReport
from mmjax.sharding import Rules
from mmjax.training import flops
from mmjax.training.checkpoint import Checkpointer, NonFiniteState
from mmjax.training.config import ProfileConfig, TrainConfig
from mmjax.training.metrics import MetricWriter, format_duration
from mmjax.training.optimizer import OptimConfig, learning_rates


class NonFiniteStop(RuntimeError):
    """K steps in a row had a non-finite loss or gradient, or no label tokens."""


@dataclasses.dataclass
class Rates:
    """Per-step device metrics -> tokens/s, step time, data wait, model TFLOP/s and MFU.

    `mfu` counts the model FLOPs of the real (non-pad) tokens and the images; `mfu_all_slots`
    counts every slot of every row and every image slot, padding included, as MaxText does
    (its figure is higher by the padding share)."""

    flop_model: flops.FlopModel
    peak: float | None  # per-device peak FLOP/s (None: unknown, no MFU)
    devices: int

    def __call__(self, per_step: list[dict], seconds: float, data_wait: float) -> dict:
        n = len(per_step)
        tokens = sum(int(m["real_tokens"]) for m in per_step)
        model_flops = self.flop_model.step(tokens, sum(int(m["images"]) for m in per_step))
        out = {"tokens_per_s": tokens / seconds, "step_time_s": seconds / n,
               "data_wait_s": data_wait / n, "data_wait_share": data_wait / seconds,
               "tflops_per_s_per_device": model_flops / seconds / self.devices / 1e12}
        mfu = flops.mfu(model_flops, seconds, self.devices, self.peak)
        if mfu is not None:
            out["mfu"] = mfu
        # MaxText's count: every slot of every row (padding included) and every image slot
        if "slot_tokens" in per_step[0]:
            slots = sum(int(m["slot_tokens"]) for m in per_step)
            out["tokens_per_s_all_slots"] = slots / seconds
            all_flops = self.flop_model.step(slots, sum(int(m["image_slots"]) for m in per_step))
            mfu_all = flops.mfu(all_flops, seconds, self.devices, self.peak)
            if mfu_all is not None:
                out["mfu_all_slots"] = mfu_all
        return out


@dataclasses.dataclass(frozen=True)
class Settings:
    """The few settings the loop reads."""

    total_steps: int
    log_every: int = 10
    log_sample_ids: bool = False
    max_skipped_in_a_row: int = 5
    profile: ProfileConfig = ProfileConfig()

    @classmethod
    def of(cls, tc: TrainConfig, total_steps: int) -> "Settings":
        return cls(total_steps, tc.log_every, tc.log_sample_ids, tc.max_skipped_in_a_row,
                   tc.profile)


@dataclasses.dataclass(kw_only=True)
class Loop:
    """The parts the loop runs (built by `mmjax.training.run`)."""

    step_fn: Callable  # (state, global batch) -> (state, metrics), jitted
    data: Any  # build_pipeline's iterator (this process's rows)
    mesh: jax.sharding.Mesh
    rules: Rules
    checkpointer: Checkpointer
    writer: MetricWriter
    rates: Rates
    optim: OptimConfig  # for the learning rates in the logs
    workdir: Path
    settings: Settings
    evaluator: Callable[[Any, int], dict] | None = None  # (params, step) -> metrics
    eval_due: Callable[[int, int], bool] = lambda done, total: False


def run(loop: Loop, state) -> dict:
    """Trains from `state` to `loop.settings.total_steps` (or a preemption); returns the
    history."""
    lead = jax.process_index() == 0
    start = int(state.step) + int(state.skipped)
    cfg = loop.settings
    steps = cfg.total_steps
    ids_file = (open(loop.workdir / "samples.jsonl", "a") if cfg.log_sample_ids and lead
                else None)
    history = {"loss": [], "preempted": False}
    profile = Profile(loop.workdir / "profile", cfg.profile)
    sigterm = Sigterm()
    pending: list = []
    t_last, wait, t0 = time.perf_counter(), 0.0, time.perf_counter()
    try:
        for step in range(start, steps):
            profile.before(step)
            t = time.perf_counter()
            try:
                sigterm.waiting = True  # SIGTERM now interrupts the wait (see Sigterm)
                batch = next(loop.data)
            except InterruptedWait:
                if lead:
                    print(f"SIGTERM while waiting for the data of step {step + 1}: stopping "
                          f"without a new checkpoint; {_intact(loop.checkpointer)} resumes "
                          "the run", flush=True)
                history["preempted"] = True
                break
            finally:
                sigterm.waiting = False
            wait += time.perf_counter() - t
            state, metrics = loop.step_fn(
                state, batch_format.global_batch(batch, loop.mesh, loop.rules))
            pending.append(metrics)
            done = step + 1
            profile.after(done, state)
            if ids_file is not None:
                ids_file.write(json.dumps({"step": done, "ids": batch["ids"],
                                           "loss": float(metrics["loss"])}) + "\n")
                ids_file.flush()
            loop.checkpointer.check_for_errors()  # a failed background save stops the run
            if done % cfg.log_every == 0 or done == steps:
                per_step = jax.device_get(pending)
                _stop_if_skipping(per_step, done, cfg.max_skipped_in_a_row,
                                  loop.checkpointer)
                now = time.perf_counter()
                rec = _record(loop, state, per_step, done, now - t_last, wait)
                history["loss"].append((done, rec["loss"]))
                loop.writer.write(done, rec)
                if lead:
                    print(_console(done, steps, rec, (now - t0) / (done - start)), flush=True)
                pending, t_last, wait = [], now, 0.0
            if loop.evaluator is not None and loop.eval_due(done, steps):
                _evaluate(loop, state, done, lead)
            if done == steps or loop.checkpointer.should_save(done):
                _save_unless_skipping(loop, state, done, force=done == steps)
            if sigterm.received or loop.checkpointer.reached_preemption(done):
                _save(loop, state, done, force=True)
                loop.checkpointer.wait()
                if lead:
                    print(f"preempted at step {done}: checkpoint saved in "
                          f"{loop.checkpointer.directory}; rerun the same command to resume",
                          flush=True)
                history["preempted"] = True
                break
    finally:
        sigterm.restore()
        profile.stop(state)
        if ids_file is not None:
            ids_file.close()
    history["state"] = state
    return history


def _record(loop: Loop, state, per_step: list[dict], done: int, seconds: float,
            wait: float) -> dict:
    last = per_step[-1]
    return {"loss": float(last["loss"]), "grad_norm": float(last["grad_norm"]),
            "param_norm": float(last["param_norm"]),
            **{k: float(v) for k, v in learning_rates(loop.optim, done - 1).items()},
            **loop.rates(per_step, seconds, wait),
            "skipped_steps": int(state.skipped),
            "skipped_steps_in_window": int(sum(bool(m["skipped"]) for m in per_step)),
            "label_tokens": int(last["label_tokens"]),
            **total_report(loop.data).metrics()}


def _evaluate(loop: Loop, state, done: int, lead: bool) -> None:
    t = time.perf_counter()
    metrics = loop.evaluator(state.params, done)
    if not metrics:
        return
    seconds = time.perf_counter() - t
    loop.writer.write(done, {**metrics, "eval/seconds": seconds})
    if lead:
        shown = [(k, v) for k, v in metrics.items() if k == "val/loss" or (
            k.startswith("eval/") and k.count("/") == 2 and not k.endswith("skipped"))]
        print(f"step {done}: eval " + ", ".join(
            f"{k.removeprefix('eval/')} {v:.4g}" for k, v in shown[:8]) + f" ({seconds:.0f}s)",
            flush=True)


def total_report(data_it) -> SkipReport:
    """The skip tallies of every process, summed (a collective: every process calls it)."""
    report = skip_report(data_it)
    if jax.process_count() == 1:
        return report
    vectors = multihost_utils.process_allgather(np.asarray(report.vector(), np.int64))
    return SkipReport.from_vector(np.sum(vectors, axis=0), report.max_bad_share)


def _intact(ckpt: Checkpointer) -> str:
    return (f"the newest intact checkpoint, step {ckpt.intact}," if ckpt.intact is not None
            else "no checkpoint of this run is intact yet; the initial state")


def _nonfinite(step: int, in_a_row: int, ckpt: Checkpointer) -> NonFiniteStop:
    return NonFiniteStop(
        f"step {step}: {in_a_row} steps in a row had a non-finite loss or gradient, or no "
        f"label tokens; stopping without saving ({_intact(ckpt)} is where a rerun resumes)")


def _stop_if_skipping(per_step: list[dict], last_step: int, limit: int,
                      ckpt: Checkpointer) -> None:
    first = last_step - len(per_step) + 1
    for i, m in enumerate(per_step):
        if int(m["skipped_in_a_row"]) >= limit:
            raise _nonfinite(first + i, int(m["skipped_in_a_row"]), ckpt)


def _save(loop: Loop, state, done: int, force: bool) -> None:
    loop.writer.flush()  # the logs reach the checkpoint's step before it can be restored
    try:
        loop.checkpointer.save(done, state, loop.data, force=force)
    except NonFiniteState as e:
        raise NonFiniteStop(f"{e} ({_intact(loop.checkpointer)} is where a rerun "
                            "resumes)") from None


def _save_unless_skipping(loop: Loop, state, done: int, force: bool) -> None:
    """A save due now, unless the run is inside a streak of skipped (non-finite) steps: then
    the older checkpoints stay (retention would drop the last good one) and the save waits
    for a good step; at the limit the run stops without saving."""
    in_a_row = int(state.skipped_in_a_row)  # a host sync, only on save steps
    if in_a_row >= loop.settings.max_skipped_in_a_row:
        raise _nonfinite(done, in_a_row, loop.checkpointer)
    if in_a_row:
        if jax.process_index() == 0:
            print(f"step {done}: checkpoint deferred, the last {in_a_row} step(s) were "
                  "skipped as non-finite", flush=True)
        return
    _save(loop, state, done, force)


def _console(done, steps, rec, sec_per_step) -> str:
    mfu = f" mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
    if "mfu_all_slots" in rec:
        mfu += f" ({rec['mfu_all_slots']:.1%} all slots)"
    lrs = " ".join(f"{v:.2e}" for k, v in rec.items() if k.startswith("lr/"))
    return (f"step {done}/{steps} loss {rec['loss']:.4f} grad {rec['grad_norm']:.3f} lr {lrs} "
            f"{rec['tokens_per_s']:.0f} tok/s{mfu} {rec['step_time_s']:.3f}s/step "
            f"data-wait {rec['data_wait_share']:.0%} "
            f"eta {format_duration(sec_per_step * (steps - done))}")


class InterruptedWait(Exception):
    """SIGTERM arrived while the loop was waiting for data."""


class Sigterm:
    """Single process: SIGTERM (SLURM, Kubernetes, a spot VM's notice) means save and exit.
    Several processes use JAX's preemption sync point instead (all stop at one step).
    SIGTERM during a data wait lets the batch arrive for `WAIT_GRACE_S` (the step then
    saves as usual); a wait that outlasts it (data that never comes) is interrupted, and
    the run stops without a new checkpoint (the data iterator is mid-batch)."""

    WAIT_GRACE_S = 10.0

    def __init__(self):
        self.received = False
        self._waiting = False
        self._previous = self._previous_alarm = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._previous_alarm = signal.signal(signal.SIGALRM, self._alarm)

    @property
    def waiting(self) -> bool:
        return self._waiting

    @waiting.setter
    def waiting(self, value: bool) -> None:
        self._waiting = value
        if not value and self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)  # the batch came: no interruption

    def _handle(self, *_):
        self.received = True
        if self._waiting:
            signal.setitimer(signal.ITIMER_REAL, self.WAIT_GRACE_S)

    def _alarm(self, *_):
        if self._waiting:
            self._waiting = False
            raise InterruptedWait()

    def restore(self):
        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGTERM, self._previous)
            signal.signal(signal.SIGALRM, self._previous_alarm)


class Profile:
    """A `jax.profiler` trace over steps [start, start + num) into `directory` (TensorBoard's
    profile plugin or Perfetto reads it); off when num is 0."""

    def __init__(self, directory: Path, cfg: ProfileConfig):
        self.directory, self.start = directory, cfg.start_step
        self.end = cfg.start_step + cfg.num_steps
        self.active = False
        self.enabled = cfg.num_steps > 0

    def before(self, step: int) -> None:
        if self.enabled and step == self.start and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, done: int, state) -> None:
        if self.active and done >= self.end:
            self.stop(state)

    def stop(self, state) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile written to {self.directory}", flush=True)
