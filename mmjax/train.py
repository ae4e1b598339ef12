"""Two-stage LLaVA training.

    python -m mmjax.train --config configs/stage2.py[:VARIANT] --workdir DIR [--config.x=y ...]

Resume order: a checkpoint in DIR (the newest finished one, data iterator included), else
fresh parameters (stage-1 checkpoint parts, HF weights, random; see mmjax.training.init).
Exit status: 0 done, 75 preempted (checkpoint saved; rerun the same command), 2 a config
mistake (one line says which), else an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax

from mmjax import batch as batch_format
from mmjax import configlib, distributed
from mmjax.data.pipeline import build_pipeline
from mmjax.hf import load_tokenizer
from mmjax.models import Llava
from mmjax.models.config import ConfigError
from mmjax.models.factory import abstract_variables
from mmjax.sharding import logical_shardings, mesh_rules, plain
from mmjax.training import flops, loop
from mmjax.training.checkpoint import Checkpointer, abstract_with_shardings
from mmjax.training.config import TrainConfig
from mmjax.training.init import initial_params
from mmjax.training.metrics import MetricWriter
from mmjax.training.step import StepConfig, Trainer

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on a preemption notice; rerun to resume


def validate(tc: TrainConfig) -> None:
    """Fails at start, naming the fields to set, when a recipe has no weights or data."""
    missing = []
    if not tc.init.random and not (tc.init.hf_llava or (tc.init.hf_vision and tc.init.hf_llm)):
        missing.append("init.hf_llava, or init.hf_vision and init.hf_llm")
    if not tc.data.sources:
        missing.append("data.sources (e.g. [{'kind': 'llava_json', 'path': ..., "
                       "'image_root': ...}])")
    if tc.stage == 2 and not tc.init.stage1_checkpoint and not tc.init.hf_llava:
        missing.append("init.stage1_checkpoint (the stage-1 work dir)")
    if not (tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm):
        missing.append("tokenizer")
    if missing:
        raise ConfigError("config is missing: " + "; ".join(missing) + ". Set them with "
                          "--config.FIELD=... (see README 'Training'), or run the embedded "
                          "demo: make demo")
    if not tc.logical_axis_rules:
        raise ConfigError("logical_axis_rules is empty: start from configs/common.py")


def train(c, workdir: Path) -> dict:
    """Runs (or resumes) one stage in `workdir` from a TrainConfig (or its ConfigDict);
    returns {'loss': [(step, loss)], 'state', 'preempted'}."""
    tc = c if isinstance(c, TrainConfig) else configlib.train_config(c)
    lead = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if lead:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
        print(f"config: {workdir / 'config.json'} (model {tc.model}, stage {tc.stage})",
              flush=True)
    rt, rules, mesh = tc.model_runtime, tc.logical_axis_rules, configlib.make_mesh(tc)
    cfg = configlib.model(tc)
    model = Llava(cfg, rt)
    tokenizer = load_tokenizer(tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm)
    dcfg = tc.data_config(jax.process_count())
    steps = tc.steps(dcfg)
    optim = dataclasses.replace(tc.optim, groups=tc.optimizer_groups, total_steps=steps)
    trainer = Trainer(model, optim, StepConfig(tc.grad_accum, tc.seed))
    boxed = abstract_variables(cfg, rt)["params"]
    param_sh, abstract_params = logical_shardings(boxed, mesh, rules), plain(boxed)
    state_sh = trainer.state_shardings(param_sh, abstract_params)
    data_it = build_pipeline(dcfg, tokenizer, cfg)
    ckpt = Checkpointer(workdir / "checkpoints", tc.checkpoint)
    trained = flops.Trained.from_labels(trainer.labels(abstract_params))
    rates = loop.Rates(flops.FlopModel.of(cfg, rt, trained, dcfg.row_len),
                       flops.peak_flops(jax.devices()[0].device_kind, tc.metrics.peak_tflops),
                       jax.device_count())
    if lead:
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
              f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es); "
              f"{steps} steps; trained: {trained}", flush=True)

    with mesh_rules(mesh, rules):
        latest = ckpt.latest_step()
        if latest is not None:
            abstract = abstract_with_shardings(
                jax.eval_shape(trainer.create_state, abstract_params), state_sh)
            state = ckpt.restore(latest, abstract, data_it)
            if lead:
                print(f"resumed from {workdir / 'checkpoints'} step {latest}", flush=True)
        else:
            params = initial_params(model, tc.init, abstract_params, param_sh, rt, mesh, rules,
                                    tc.seed)
            state = jax.jit(trainer.create_state, out_shardings=state_sh)(params)
        step_fn = trainer.jit_step(state_sh, batch_format.shardings(mesh, rules))
        writer = MetricWriter(workdir, tc.metrics, dataclasses.asdict(tc) if lead else None)
        try:
            history = loop.run(loop.Loop(
                step_fn, data_it, mesh, rules, ckpt, writer, rates, optim, steps, workdir,
                tc.log_every, tc.log_sample_ids, tc.max_skipped_in_a_row, tc.profile), state)
        finally:
            writer.close()
    ckpt.wait()
    ckpt.close()
    report = loop.total_report(data_it)  # a collective: every process takes part
    if lead:
        print(report.summary(), flush=True)
    return history


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mmjax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/stage1.py[:VARIANT]")
    parser.add_argument("--workdir", required=True)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tc = configlib.train_config(configlib.load(args.config, overrides))
    validate(tc)
    distributed.initialize(tc.distributed)
    return train(tc, Path(args.workdir))


if __name__ == "__main__":
    try:
        result = main()
    except (ConfigError, loop.NonFiniteStop) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    sys.exit(PREEMPTED_EXIT if result.get("preempted") else 0)
