"""Two-stage LLaVA training.

    python -m mmjax.train --config configs/stage2.py[:VARIANT] --workdir DIR [--config.x=y ...]

Resume order: a checkpoint in DIR (the newest finished one, data iterator included), else
fresh parameters (stage-1 checkpoint parts, HF weights, random; see mmjax.training.init).
Exit status: 0 done, 75 preempted (checkpoint saved; rerun the same command), else an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from mmjax import configlib, distributed
from mmjax.data.pipeline import DataConfig, SourceConfig, build_pipeline, global_batch, skip_report
from mmjax.data.quality import SkipReport
from mmjax.hf import load_tokenizer
from mmjax.models import Llava
from mmjax.models.factory import abstract_variables
from mmjax.sharding import logical_shardings, mesh_rules, plain
from mmjax.training import flops, lora
from mmjax.training.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings
from mmjax.training.init import initial_params
from mmjax.training.metrics import MetricWriter, format_duration
from mmjax.training.optimizer import OptimConfig, learning_rates
from mmjax.training.step import StepConfig, Trainer, batch_shardings

log = logging.getLogger("mmjax.train")


def validate(c) -> None:
    """Fails at start, naming the fields to set, when a recipe has no weights or data."""
    missing = []
    if not c.init.random and not (c.init.hf_llava or (c.init.hf_vision and c.init.hf_llm)):
        missing.append("init.hf_llava, or init.hf_vision and init.hf_llm")
    if not c.data.sources:
        missing.append("data.sources (e.g. [{'kind': 'llava_json', 'path': ..., "
                       "'image_root': ...}])")
    if c.stage == 2 and not c.init.stage1_checkpoint and not c.init.hf_llava:
        missing.append("init.stage1_checkpoint (the stage-1 work dir)")
    if not (c.tokenizer or c.init.hf_llava or c.init.hf_llm):
        missing.append("tokenizer")
    if missing:
        raise SystemExit(
            "config is missing: " + "; ".join(missing) + ".\nSet them with --config.FIELD=..."
            " (see README 'Training'), or run the embedded demo: make demo")


def data_config(c, process_count: int) -> DataConfig:
    d = c.data
    if c.batch_size % (process_count * c.grad_accum):
        raise SystemExit(f"batch_size {c.batch_size} is not divisible by processes x grad_accum")
    return DataConfig(
        sources=tuple(SourceConfig(s["kind"], s["path"], s.get("image_root", ""),
                                   s.get("weight", 1.0)) for s in d.sources),
        template=d.template, max_length=d.max_length, batch_size=c.batch_size // process_count,
        packing=d.packing, max_images_per_row=d.max_images_per_row, image_aspect=d.image_aspect,
        seed=c.seed, num_epochs=None, workers=d.workers, max_bad_share=d.max_bad_share)


def total_steps(c, dcfg: DataConfig) -> int:
    if c.total_steps:
        return c.total_steps
    from mmjax.data.pipeline import open_source

    n = sum(len(open_source(s, dcfg)) for s in dcfg.sources)
    return max(1, c.num_epochs * n // c.batch_size)


def optimizer_groups(c) -> tuple:
    if c.lora.enabled:
        return tuple(tuple(g) for g in lora.groups(c.lora.lr, c.lora.projector_lr))
    return tuple(tuple(g) for g in c.optim.groups)


def trained_parts(labels) -> flops.Trained:
    """What the optimizer updates, by tower, for the FLOP count."""
    trains = {part: any(g >= 0 for g in jax.tree.leaves(tree)) for part, tree in labels.items()}
    upstream = trains.get("vision_tower", False) or trains.get("projector", False)
    return flops.Trained(vision=trains.get("vision_tower", False),
                         projector=trains.get("projector", False),
                         llm=trains.get("language_model", False), llm_gets_gradients=upstream)


def train(c, workdir: Path) -> dict:
    """Runs (or resumes) one stage in `workdir`; returns {'loss': [(step, loss)], 'state',
    'preempted'}."""
    lead = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
        print(f"config ({workdir / 'config.json'}):\n{c}", flush=True)
    rt, rules = configlib.runtime(c), configlib.rules(c)
    mesh = configlib.make_mesh(c)
    cfg = configlib.model(c)
    model = Llava(cfg, rt)
    tokenizer = load_tokenizer(c.tokenizer or c.init.hf_llava or c.init.hf_llm)
    dcfg = data_config(c, jax.process_count())
    steps = total_steps(c, dcfg)
    optim = OptimConfig(groups=optimizer_groups(c), total_steps=steps,
                        warmup_ratio=c.optim.warmup_ratio, weight_decay=c.optim.weight_decay,
                        grad_clip=c.optim.grad_clip, schedule=c.optim.schedule)
    trainer = Trainer(model, optim, StepConfig(c.grad_accum, c.seed))
    boxed = abstract_variables(cfg, rt)["params"]
    param_sh = logical_shardings(boxed, mesh, rules)
    abstract_params = plain(boxed)
    state_sh = trainer.state_shardings(param_sh, abstract_params)
    data_it = build_pipeline(dcfg, tokenizer, cfg)
    ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(
        c.checkpoint.save_interval, c.checkpoint.keep_last, c.checkpoint.keep_every or None,
        c.checkpoint.async_save))
    meter = Meter(cfg, rt, trained_parts(trainer.labels(abstract_params)), dcfg.row_len,
                  flops.peak_flops(jax.devices()[0].device_kind, c.metrics.peak_tflops),
                  jax.device_count())
    if lead:
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
              f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es); "
              f"{steps} steps; trained: {meter.trained}", flush=True)

    with mesh_rules(mesh, rules):
        latest = ckpt.latest_step()
        if latest is not None:
            abstract = abstract_with_shardings(
                jax.eval_shape(trainer.create_state, abstract_params), state_sh)
            state = ckpt.restore(latest, abstract, data_it)
            if lead:
                print(f"resumed from {workdir / 'checkpoints'} step {latest}", flush=True)
        else:
            params = initial_params(model, c.init, abstract_params, param_sh, rt, mesh, rules,
                                    c.seed)
            state = jax.jit(trainer.create_state, out_shardings=state_sh)(params)
        step_fn = trainer.jit_step(state_sh, batch_shardings(mesh, rules))
        writer = MetricWriter(workdir, c.metrics.tensorboard, c.metrics.wandb_project,
                              c.metrics.wandb_name, c.to_dict() if lead else None)
        try:
            history = run_loop(c, state, step_fn, data_it, mesh, rules, ckpt, steps, workdir,
                               writer, meter, optim)
        finally:
            writer.close()
    ckpt.wait()
    ckpt.close()
    report = _total_report(data_it)  # a collective: every process takes part
    if lead:
        print(report.summary(), flush=True)
    return history


class Meter:
    """Turns per-step device metrics into rates: tokens/s, step time, MFU."""

    def __init__(self, cfg, rt, trained, row_len, peak, devices):
        self.trained, self.peak, self.devices = trained, peak, devices
        self.per_token, self.per_image = flops.coefficients(cfg, rt, trained, row_len)

    def rates(self, per_step: list[dict], seconds: float, data_wait: float) -> dict:
        n = len(per_step)
        tokens = sum(int(m["real_tokens"]) for m in per_step)
        images = sum(int(m["images"]) for m in per_step)
        model_flops = self.per_token * tokens + self.per_image * images
        out = {"tokens_per_s": tokens / seconds, "step_time_s": seconds / n,
               "data_wait_s": data_wait / n, "data_wait_share": data_wait / seconds,
               "tflops_per_s_per_device": model_flops / seconds / self.devices / 1e12}
        mfu = flops.mfu(model_flops, seconds, self.devices, self.peak)
        if mfu is not None:
            out["mfu"] = mfu
        return out


def _total_report(data_it) -> SkipReport:
    """The skip tallies of every process, summed."""
    report = skip_report(data_it)
    if jax.process_count() == 1:
        return report
    from jax.experimental import multihost_utils

    vectors = multihost_utils.process_allgather(np.asarray(report.vector(), np.int64))
    return SkipReport.from_vector(np.sum(vectors, axis=0), report.max_bad_share)


class _Sigterm:
    """Single process: SIGTERM (SLURM, Kubernetes, a spot VM's notice) means save and exit.
    Several processes use JAX's preemption sync point instead (all stop at one step)."""

    def __init__(self):
        self.received = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.received = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_loop(c, state, step_fn, data_it, mesh, rules, ckpt, steps, workdir, writer, meter,
             optim):
    lead = jax.process_index() == 0
    start = int(state.step) + int(state.skipped)
    ids_file = open(workdir / "samples.jsonl", "a") if c.log_sample_ids and lead else None
    history = {"loss": [], "preempted": False}
    profile = Profile(workdir / "profile", c.profile.start_step, c.profile.num_steps)
    sigterm = _Sigterm()
    pending: list = []
    t_last, wait, t0 = time.perf_counter(), 0.0, time.perf_counter()
    try:
        for step in range(start, steps):
            profile.before(step)
            t = time.perf_counter()
            batch = next(data_it)
            wait += time.perf_counter() - t
            state, metrics = step_fn(state, global_batch(batch, mesh, rules))
            pending.append(metrics)
            done = step + 1
            profile.after(done, state)
            if ids_file is not None:
                ids_file.write(json.dumps({"step": done, "ids": batch["ids"],
                                           "loss": float(metrics["loss"])}) + "\n")
                ids_file.flush()
            if done % c.log_every == 0 or done == steps:
                per_step = jax.device_get(pending)
                _stop_if_skipping(per_step, done, c.max_skipped_in_a_row)
                now = time.perf_counter()
                rec = {"loss": float(per_step[-1]["loss"]),
                       "grad_norm": float(per_step[-1]["grad_norm"]),
                       **{k: float(v) for k, v in learning_rates(optim, done - 1).items()},
                       **meter.rates(per_step, now - t_last, wait),
                       "skipped_steps": int(state.skipped),
                       "label_tokens": int(per_step[-1]["label_tokens"]),
                       **_total_report(data_it).metrics()}
                history["loss"].append((done, rec["loss"]))
                writer.write(done, rec)
                if lead:
                    print(_console(done, steps, rec, (now - t0) / (done - start)), flush=True)
                pending, t_last, wait = [], now, 0.0
            ckpt.save(done, state, data_it, force=done == steps)
            if sigterm.received or ckpt.reached_preemption(done):
                ckpt.save(done, state, data_it, force=True)
                ckpt.wait()
                if lead:
                    print(f"preempted at step {done}: checkpoint saved in "
                          f"{workdir / 'checkpoints'}; rerun the same command to resume",
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


def _stop_if_skipping(per_step: list[dict], last_step: int, limit: int) -> None:
    first = last_step - len(per_step) + 1
    for i, m in enumerate(per_step):
        if int(m["skipped_in_a_row"]) >= limit:
            raise SystemExit(f"step {first + i}: {int(m['skipped_in_a_row'])} steps in a row "
                             "had a non-finite loss or gradient, or no label tokens; stopping "
                             "(the last checkpoint is intact)")


def _console(done, steps, rec, sec_per_step) -> str:
    mfu = f" mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
    lrs = " ".join(f"{v:.2e}" for k, v in rec.items() if k.startswith("lr/"))
    return (f"step {done}/{steps} loss {rec['loss']:.4f} grad {rec['grad_norm']:.3f} lr {lrs} "
            f"{rec['tokens_per_s']:.0f} tok/s{mfu} {rec['step_time_s']:.3f}s/step "
            f"data-wait {rec['data_wait_share']:.0%} "
            f"eta {format_duration(sec_per_step * (steps - done))}")


class Profile:
    """A `jax.profiler` trace over steps [start, start + num) into `directory` (TensorBoard's
    profile plugin or Perfetto reads it); off when num is 0."""

    def __init__(self, directory: Path, start: int, num: int):
        self.directory, self.start, self.end = directory, start, start + num
        self.active = False
        self.enabled = num > 0

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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mmjax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/stage1.py[:VARIANT]")
    parser.add_argument("--workdir", required=True)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    c = configlib.load(args.config, overrides)
    validate(c)
    distributed.initialize(configlib.distributed(c))
    return train(c, Path(args.workdir))


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on a preemption notice; rerun to resume


if __name__ == "__main__":
    result = main()
    sys.exit(PREEMPTED_EXIT if result.get("preempted") else 0)
