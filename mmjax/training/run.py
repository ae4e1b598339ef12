"""One training stage from start to end: what `python -m mmjax.train` and the demo run.

    history = train(tc, workdir, evaluators=...)   # {'loss': [(step, loss)], 'state', ...}

The order, in one place:
1. `prepare`: the mesh, `grad_accum` made concrete, the checkpointer, the config check on
   resume, the model (`model_spec`: the run's own on resume, else resolved and saved), the
   data config and step count, and the step (`StepSetup`). No data is read, nothing runs.
2. the data pipeline; then `restore_or_init`: the newest verified checkpoint in the work
   dir (state and data position), else fresh parameters (stage-1 checkpoint parts, HF
   weights, random; `training.init`).
3. the loop (`training.loop`), with the evaluators the caller builds from the `RunContext`
   (`mmjax.evaluation.during_training`): training itself never imports inference or
   evaluation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from mmjax import batch as batch_format
from mmjax.data.pipeline import DataConfig, build_pipeline, check_aspect
from mmjax.errors import ConfigError
from mmjax.models import Llava
from mmjax.models.config import LlavaConfig, RuntimeConfig
from mmjax.models.factory import abstract_variables
from mmjax.models.runtime import resolve
from mmjax.sharding import logical_shardings, mesh_rules, plain, with_shardings
from mmjax.training import flops, loop, model_spec
from mmjax.training.checkpoint import Checkpointer
from mmjax.training.config import TrainConfig, check_batch_fits_mesh
from mmjax.training.init import initial_params
from mmjax.training.metrics import MetricWriter
from mmjax.training.model_spec import ModelSpec
from mmjax.training.optimizer import OptimConfig
from mmjax.training.step import StepConfig, Trainer
from mmjax.training.workdir import WorkdirLock, check_resume_config, truncate_logs

Say = Callable[[str], None]


@dataclasses.dataclass
class StepSetup:
    """The train step of a config on a mesh, as `train` runs it and `mmjax.aot` compiles it:
    the runtime with its `auto` choices made for the mesh's devices (`models.runtime`), the
    model, the trainer, and the parameter, state and batch shardings."""

    rt: RuntimeConfig
    model: Llava
    optim: OptimConfig
    trainer: Trainer
    param_sh: Any
    abstract_params: Any
    state_sh: Any
    batch_sh: dict

    @classmethod
    def of(cls, tc: TrainConfig, cfg: LlavaConfig, mesh: Mesh, steps: int) -> "StepSetup":
        rt = resolve(tc.model_runtime, mesh.devices.flat[0])
        rules = tc.logical_axis_rules
        model = Llava(cfg, rt)
        optim = dataclasses.replace(tc.optim, groups=tc.optimizer_groups, total_steps=steps)
        trainer = Trainer(model, optim, StepConfig(tc.grad_accum, tc.seed))
        boxed = abstract_variables(cfg, rt)["params"]
        param_sh, abstract_params = logical_shardings(boxed, mesh, rules), plain(boxed)
        return cls(rt, model, optim, trainer, param_sh, abstract_params,
                   trainer.state_shardings(param_sh, abstract_params),
                   batch_format.shardings(mesh, rules, cfg.batch_views, cfg.taps))

    def jit_step(self):
        return self.trainer.jit_step(self.state_sh, self.batch_sh)

    def abstract_state(self):
        return with_shardings(jax.eval_shape(self.trainer.create_state, self.abstract_params),
                              self.state_sh)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a run has built, for the evaluators its caller makes (`Evaluators`)."""

    tc: TrainConfig
    spec: ModelSpec  # the model, tokenizer and template
    data: DataConfig  # this process's data settings (template resolved)
    setup: StepSetup
    mesh: Mesh
    workdir: Path
    writer: MetricWriter


# (context) -> an evaluator ((params, step) -> metrics) or None; see training.loop.Loop
Evaluators = Callable[[RunContext], Callable[[Any, int], dict] | None]


@dataclasses.dataclass
class Prepared:
    """A run's parts before any data is read or anything computed (`prepare`)."""

    tc: TrainConfig  # grad_accum made concrete for the mesh
    mesh: Mesh
    checkpointer: Checkpointer
    latest: int | None  # the newest checkpoint's step, None for a fresh run
    spec: ModelSpec
    data: DataConfig
    steps: int
    setup: StepSetup


def train(tc: TrainConfig, workdir: Path, *, allow_config_change: bool = False,
          evaluators: Evaluators | None = None) -> dict:
    """Runs (or resumes) one stage in `workdir`; returns {'loss': [(step, loss)], 'state',
    'preempted'}. Holds the work dir's lock while it runs."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(tc, workdir, allow_config_change, evaluators)
    finally:
        if lock is not None:
            lock.release()


def _say() -> Say:
    lead = jax.process_index() == 0
    return (lambda m: print(m, flush=True)) if lead else (lambda m: None)


def prepare(tc: TrainConfig, workdir: Path, allow_config_change: bool, say: Say) -> Prepared:
    """Step 1 of the module docstring."""
    mesh = tc.make_mesh()
    tc = tc.for_mesh(mesh)  # grad_accum=0 (auto) made concrete
    check_batch_fits_mesh(tc, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", tc.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        check_resume_config(workdir, dataclasses.asdict(tc), latest, allow_config_change, say)
    # the model and tokenizer: the run's own on resume, else resolved (and checked) before
    # any compute
    resuming = latest is not None and (workdir / model_spec.MODEL_FILE).exists()
    spec = model_spec.resolve(tc, workdir if resuming else None)
    check_aspect(tc.data, spec.cfg)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
        if not resuming:
            model_spec.save(spec, workdir)
    say(f"config: {workdir / 'config.json'} (stage {tc.stage}); model "
        f"{workdir / model_spec.MODEL_FILE}: {spec.describe()}")
    data = dataclasses.replace(tc.data_config(jax.process_count()), template=spec.template)
    steps = tc.steps(data)
    setup = StepSetup.of(tc, spec.cfg, mesh, steps)
    ckpt.meta = {"data_workers": data.workers, "processes": jax.process_count()}
    return Prepared(tc, mesh, ckpt, latest, spec, data, steps, setup)


def restore_or_init(p: Prepared, data_it, say: Say):
    """Step 2 of the module docstring: (state, first step). Under the mesh's rules."""
    def check_meta(step: int, meta: dict) -> None:
        saved = meta.get("data_workers")
        if saved is not None and saved != p.data.workers:
            raise ConfigError(
                f"checkpoint step {step} was saved with data.workers={saved} and the data "
                f"position is kept per worker; resume with --config.data.workers={saved}")

    if p.latest is not None:
        restored = p.checkpointer.restore_latest(p.setup.abstract_state(), data_it, check_meta,
                                                 say)
        if restored is not None:
            state, start = restored
            say(f"resumed from {p.checkpointer.directory} step {start}")
            return state, start
    s = p.setup
    params = initial_params(s.model, p.tc.init, s.abstract_params, s.param_sh, s.rt, p.mesh,
                            p.tc.logical_axis_rules, p.tc.seed)
    return jax.jit(s.trainer.create_state, out_shardings=s.state_sh)(params), 0


def _train(tc: TrainConfig, workdir: Path, allow_config_change: bool,
           evaluators: Evaluators | None) -> dict:
    say = _say()
    p = prepare(tc, workdir, allow_config_change, say)
    tc, s = p.tc, p.setup
    data_it = build_pipeline(p.data, p.spec.tokenizer, p.spec.cfg)
    trained = flops.Trained.from_labels(s.trainer.labels(s.abstract_params))
    rates = loop.Rates(flops.FlopModel.of(p.spec.cfg, s.rt, trained, p.data.row_len),
                       flops.peak_flops(jax.devices()[0].device_kind, tc.metrics.peak_tflops),
                       jax.device_count())
    say(f"mesh {dict(p.mesh.shape)} over {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es); "
        f"{p.steps} steps; trained: {trained}")
    with mesh_rules(p.mesh, tc.logical_axis_rules):
        state, start = restore_or_init(p, data_it, say)
        p.checkpointer.prepare(s.abstract_state())  # the checksum program, in the background
        if jax.process_index() == 0:
            truncate_logs(workdir, start)  # steps past the checkpoint are replayed
        writer = MetricWriter(workdir, tc.metrics,
                              dataclasses.asdict(tc) if jax.process_index() == 0 else None,
                              purge_step=start + 1 if start else None)
        evaluator = None
        if evaluators is not None and tc.eval.every_steps:
            evaluator = evaluators(RunContext(tc, p.spec, p.data, s, p.mesh, workdir, writer))
        try:
            history = loop.run(loop.Loop(
                step_fn=s.jit_step(), data=data_it, mesh=p.mesh, rules=tc.logical_axis_rules,
                checkpointer=p.checkpointer, writer=writer, rates=rates, optim=s.optim,
                workdir=workdir, settings=loop.Settings.of(tc, p.steps),
                evaluator=evaluator, eval_due=tc.eval.due), state)
        finally:
            writer.close()
    p.checkpointer.wait()
    p.checkpointer.close()
    report = loop.total_report(data_it)  # a collective: every process takes part
    say(report.summary())
    return history
