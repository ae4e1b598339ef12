"""Two-stage LLaVA training.

    python -m mmjax.train --config configs/stage2.py[:VARIANT] --workdir DIR [--config.x=y ...]

Resume order: a checkpoint in DIR (the newest one that reads and matches the checksums
recorded when it was saved, data iterator included), else fresh parameters (stage-1
checkpoint parts, HF weights, random; see mmjax.training.init). One run per work dir (a
lock); a resume with another config is refused unless --allow-config-change.
Exit status: 0 done, 75 preempted (checkpoint saved; rerun the same command), 2 a mistake in
the config or input (one line says which and the fix; --debug shows the traceback), 1 the
run stopped (non-finite steps, bad data, a failed save), 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax

from mmjax import batch as batch_format
from mmjax import configlib, distributed
from mmjax.data.pipeline import build_pipeline
from mmjax.data.quality import BadShareExceeded, DataStalled
from mmjax.data.sources import DataSourceError
from mmjax.models import Llava
from mmjax.models.config import ConfigError, RuntimeConfig
from mmjax.models.factory import abstract_variables
from mmjax.sharding import batch_axes, batch_ways, logical_shardings, mesh_rules, plain
from mmjax.training import flops, loop
from mmjax.training import recipe as recipe_lib
from mmjax.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_with_shardings,
    quiet_orbax_errors,
)
from mmjax.training.config import TrainConfig
from mmjax.training.evaluate import Evaluator
from mmjax.training.init import initial_params
from mmjax.training.metrics import MetricWriter
from mmjax.training.optimizer import OptimConfig
from mmjax.training.step import StepConfig, Trainer
from mmjax.training.workdir import (
    WorkdirLock,
    WorkdirLocked,
    check_resume_config,
    truncate_logs,
)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on a preemption notice; rerun to resume


def validate(tc: TrainConfig) -> None:
    """Fails at start, naming the fields to set, when a recipe has no weights or data."""
    missing = []
    towers_from_stage1 = bool(tc.init.stage1_checkpoint) and {
        "vision_tower", "language_model"} <= set(tc.init.stage1_parts)
    if not (tc.init.random or towers_from_stage1 or tc.init.hf_llava
            or (tc.init.hf_vision and tc.init.hf_llm)):
        missing.append("init.hf_llava, or init.hf_vision and init.hf_llm")
    if not tc.data.sources:
        missing.append("data.sources (e.g. [{'kind': 'llava_json', 'path': ..., "
                       "'image_root': ...}])")
    if tc.stage == 2 and not tc.init.stage1_checkpoint and not tc.init.hf_llava:
        missing.append("init.stage1_checkpoint (the stage-1 work dir)")
    if not (tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm or tc.init.stage1_checkpoint):
        missing.append("tokenizer")
    if missing:
        raise ConfigError("config is missing: " + "; ".join(missing) + ". Set them with "
                          "--config.FIELD=... (see README 'Training'), or run the embedded "
                          "demo: make demo")
    if not tc.logical_axis_rules:
        raise ConfigError("logical_axis_rules is empty: start from configs/common.py")
    paths = [("tokenizer", tc.tokenizer), ("init.hf_llava", tc.init.hf_llava),
             ("init.hf_vision", tc.init.hf_vision), ("init.hf_llm", tc.init.hf_llm),
             ("init.stage1_checkpoint", tc.init.stage1_checkpoint)]
    for i, src in enumerate(tc.data.sources):
        if src.kind != "tfds":
            paths.append((f"data.sources[{i}].path", src.path))
        if src.image_root:
            paths.append((f"data.sources[{i}].image_root", src.image_root))
    for name, path in paths:
        if path and not Path(path).exists():
            raise ConfigError(f"{name}: {path} does not exist")
    if not 0 <= tc.data.holdout_share < 1:
        raise ConfigError(f"data.holdout_share {tc.data.holdout_share} must be in [0, 1)")
    if tc.eval.every_steps and not (tc.data.holdout_share or tc.eval.benchmarks):
        raise ConfigError("eval.every_steps is set but there is nothing to evaluate: set "
                          "data.holdout_share (validation loss) and/or eval.benchmarks")
    if tc.grad_accum < 0 or tc.batch_size < 1:
        raise ConfigError(f"batch_size {tc.batch_size} must be at least 1 and grad_accum "
                          f"{tc.grad_accum} at least 0 (auto)")


def check_batch_fits_mesh(tc: TrainConfig, mesh) -> None:
    """Each micro-batch's rows split evenly over the mesh axes the batch is sharded on."""
    axes = batch_axes(tc.logical_axis_rules)
    ways = batch_ways(mesh, tc.logical_axis_rules)
    rows = tc.batch_size // tc.grad_accum
    if tc.batch_size % tc.grad_accum or rows % ways:
        split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "none"
        good = ways * tc.grad_accum
        raise ConfigError(
            f"batch_size {tc.batch_size} / grad_accum {tc.grad_accum} does not split into "
            f"micro-batches over the {ways} devices the batch is sharded on (mesh {split}); "
            f"use a multiple of {good}, e.g. --config.batch_size="
            f"{max(good, round(tc.batch_size / good) * good)}")


@dataclasses.dataclass
class StepSetup:
    """The train step of a config on a mesh, as `mmjax.train` runs it and `mmjax.aot`
    compiles it: the runtime with its `auto` choices made for the mesh's devices, the model,
    the trainer, and the parameter, state and batch shardings."""

    rt: RuntimeConfig
    model: Llava
    optim: OptimConfig
    trainer: Trainer
    param_sh: Any
    abstract_params: Any
    state_sh: Any
    batch_sh: dict

    @classmethod
    def of(cls, tc: TrainConfig, cfg, mesh, steps: int) -> "StepSetup":
        device = mesh.devices.flat[0]
        rt = tc.model_runtime.for_platform(device.platform, device.device_kind)
        rules = tc.logical_axis_rules
        model = Llava(cfg, rt)
        optim = dataclasses.replace(tc.optim, groups=tc.optimizer_groups, total_steps=steps)
        trainer = Trainer(model, optim, StepConfig(tc.grad_accum, tc.seed))
        boxed = abstract_variables(cfg, rt)["params"]
        param_sh, abstract_params = logical_shardings(boxed, mesh, rules), plain(boxed)
        return cls(rt, model, optim, trainer, param_sh, abstract_params,
                   trainer.state_shardings(param_sh, abstract_params),
                   batch_format.shardings(mesh, rules))

    def jit_step(self):
        return self.trainer.jit_step(self.state_sh, self.batch_sh)

    def abstract_state(self):
        return abstract_with_shardings(
            jax.eval_shape(self.trainer.create_state, self.abstract_params), self.state_sh)


def train(c, workdir: Path, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) one stage in `workdir` from a TrainConfig (or its ConfigDict);
    returns {'loss': [(step, loss)], 'state', 'preempted'}. Holds the work dir's lock."""
    tc = c if isinstance(c, TrainConfig) else configlib.train_config(c)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(tc, workdir, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _train(tc: TrainConfig, workdir: Path, allow_config_change: bool) -> dict:
    lead = jax.process_index() == 0
    say = (lambda m: print(m, flush=True)) if lead else (lambda m: None)
    rules, mesh = tc.logical_axis_rules, configlib.make_mesh(tc)
    tc = tc.for_mesh(mesh)  # grad_accum=0 (auto) made concrete
    check_batch_fits_mesh(tc, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", tc.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        check_resume_config(workdir, dataclasses.asdict(tc), latest, allow_config_change, say)
    # the model and tokenizer: the run's own on resume, else resolved (and checked) before
    # any compute
    resuming = latest is not None and (workdir / recipe_lib.MODEL_FILE).exists()
    recipe = recipe_lib.resolve(tc, workdir if resuming else None)
    if lead:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
        if not resuming:
            recipe_lib.save(recipe, workdir)
        say(f"config: {workdir / 'config.json'} (stage {tc.stage}); model "
            f"{workdir / recipe_lib.MODEL_FILE}: {recipe.describe()}")
    cfg, tokenizer = recipe.cfg, recipe.tokenizer
    dcfg = dataclasses.replace(tc.data_config(jax.process_count()), template=recipe.template)
    steps = tc.steps(dcfg)
    setup = StepSetup.of(tc, cfg, mesh, steps)
    model, optim, trainer, rt = setup.model, setup.optim, setup.trainer, setup.rt
    param_sh, abstract_params, state_sh = setup.param_sh, setup.abstract_params, setup.state_sh
    data_it = build_pipeline(dcfg, tokenizer, cfg)
    ckpt.meta = {"data_workers": dcfg.workers, "processes": jax.process_count()}
    trained = flops.Trained.from_labels(trainer.labels(abstract_params))
    rates = loop.Rates(flops.FlopModel.of(cfg, rt, trained, dcfg.row_len),
                       flops.peak_flops(jax.devices()[0].device_kind, tc.metrics.peak_tflops),
                       jax.device_count())
    say(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es); "
        f"{steps} steps; trained: {trained}")

    def check_meta(step: int, meta: dict) -> None:
        saved = meta.get("data_workers")
        if saved is not None and saved != dcfg.workers:
            raise ConfigError(
                f"checkpoint step {step} was saved with data.workers={saved} and the data "
                f"position is kept per worker; resume with --config.data.workers={saved}")

    with mesh_rules(mesh, rules):
        restored = None
        if latest is not None:
            restored = ckpt.restore_latest(setup.abstract_state(), data_it, check_meta, say)
        if restored is not None:
            state, start = restored
            say(f"resumed from {workdir / 'checkpoints'} step {start}")
        else:
            start = 0
            params = initial_params(model, tc.init, abstract_params, param_sh, rt, mesh, rules,
                                    tc.seed)
            state = jax.jit(trainer.create_state, out_shardings=state_sh)(params)
        if lead:
            truncate_logs(workdir, start)  # steps past the checkpoint are replayed
        step_fn = setup.jit_step()
        writer = MetricWriter(workdir, tc.metrics, dataclasses.asdict(tc) if lead else None,
                              purge_step=start + 1 if start else None)
        evaluator = None
        if tc.eval.every_steps:
            evaluator = Evaluator(tc.eval, trainer, dcfg, tokenizer, recipe.template, mesh,
                                  rules, param_sh, workdir, writer)
        try:
            history = loop.run(loop.Loop(
                step_fn, data_it, mesh, rules, ckpt, writer, rates, optim, steps, workdir,
                tc.log_every, tc.log_sample_ids, tc.max_skipped_in_a_row, tc.profile,
                evaluator if evaluator is not None and evaluator.active else None,
                tc.eval.due), state)
        finally:
            writer.close()
    ckpt.wait()
    ckpt.close()
    report = loop.total_report(data_it)  # a collective: every process takes part
    say(report.summary())
    return history


# Mistakes in the config or the input: one line (and the fix), exit 2.
USER_ERRORS = (ConfigError, DataSourceError, WorkdirLocked)
# The run stopped for a reason it states: one line, exit 1.
RUN_STOPS = (loop.NonFiniteStop, DataStalled, BadShareExceeded, CheckpointError)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mmjax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/stage1.py[:VARIANT]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the config differs from the saved one")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of the errors that are otherwise one line")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.debug:
        quiet_orbax_errors()
    try:
        tc = configlib.train_config(configlib.load(args.config, overrides))
        validate(tc)
        distributed.initialize(tc.distributed)
        result = train(tc, Path(args.workdir), args.allow_config_change)
    except USER_ERRORS + RUN_STOPS as e:
        if args.debug:
            raise
        _exit(f"error: {e}", 2 if isinstance(e, USER_ERRORS) else 1)
    except KeyboardInterrupt:
        if args.debug:
            raise
        _exit("interrupted (the newest checkpoint in the work dir resumes the run)", 130)
    return result


def _exit(message: str, status: int):
    """Prints the one line and exits now: background writer threads of a failed save would
    otherwise print tracebacks into a closed event loop at interpreter shutdown."""
    import os

    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(PREEMPTED_EXIT if main().get("preempted") else 0)
