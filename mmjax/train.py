"""Two-stage LLaVA training.

    python -m mmjax.train --config configs/stage2.py[:VARIANT] --workdir DIR [--config.x=y ...]

Resume order: a checkpoint in DIR (the newest finished one, data iterator included), else
fresh parameters (stage-1 checkpoint parts, HF weights, random; see mmjax.training.init).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from mmjax import configlib
from mmjax.data.pipeline import DataConfig, SourceConfig, build_pipeline, global_batch, skip_report
from mmjax.hf import load_tokenizer
from mmjax.models import Llava
from mmjax.models.factory import abstract_variables
from mmjax.sharding import logical_shardings, make_mesh, mesh_rules
from mmjax.training.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings
from mmjax.training.init import initial_params
from mmjax.training.optimizer import OptimConfig
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


def train(c, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    print(f"config ({workdir / 'config.json'}):\n{c}", flush=True)
    rt, rules = configlib.runtime(c), configlib.rules(c)
    mesh = make_mesh(configlib.mesh_axes(c))
    cfg = configlib.model(c)
    model = Llava(cfg, rt)
    tokenizer = load_tokenizer(c.tokenizer or c.init.hf_llava or c.init.hf_llm)
    dcfg = data_config(c, jax.process_count())
    steps = total_steps(c, dcfg)
    optim = OptimConfig(groups=tuple(tuple(g) for g in c.optim.groups), total_steps=steps,
                        warmup_ratio=c.optim.warmup_ratio, weight_decay=c.optim.weight_decay,
                        grad_clip=c.optim.grad_clip, schedule=c.optim.schedule)
    trainer = Trainer(model, optim, StepConfig(c.grad_accum))
    boxed = abstract_variables(cfg, rt)["params"]
    param_sh = logical_shardings(boxed, mesh, rules)
    abstract_params = nn.unbox(boxed)
    state_sh = trainer.state_shardings(param_sh, abstract_params)
    data_it = build_pipeline(dcfg, tokenizer, cfg)
    ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(
        c.checkpoint.save_interval, c.checkpoint.keep_last, c.checkpoint.keep_every or None,
        c.checkpoint.async_save))

    with mesh_rules(mesh, rules):
        latest = ckpt.latest_step()
        if latest is not None:
            abstract = abstract_with_shardings(
                jax.eval_shape(trainer.create_state, abstract_params), state_sh)
            state = ckpt.restore(latest, abstract, data_it)
            print(f"resumed from {workdir / 'checkpoints'} step {latest}", flush=True)
        else:
            params = initial_params(model, c.init, abstract_params, param_sh, rt, mesh, rules,
                                    c.seed)
            state = jax.jit(trainer.create_state, out_shardings=state_sh)(params)
        step_fn = trainer.jit_step(state_sh, batch_shardings(mesh, rules))
        history = run_loop(c, state, step_fn, data_it, mesh, rules, ckpt, steps, workdir)
    ckpt.wait()
    ckpt.close()
    print(skip_report(data_it).summary(), flush=True)
    return history


def run_loop(c, state, step_fn, data_it, mesh, rules, ckpt, steps, workdir):
    start = int(state.step) + int(state.skipped)
    log_file = open(workdir / "metrics.jsonl", "a")
    ids_file = open(workdir / "samples.jsonl", "a") if c.log_sample_ids else None
    history = {"loss": []}
    t_last, tokens, wait = time.perf_counter(), 0, 0.0
    t0 = time.perf_counter()
    for step in range(start, steps):
        t = time.perf_counter()
        batch = next(data_it)
        wait += time.perf_counter() - t
        state, metrics = step_fn(state, global_batch(batch, mesh, rules))
        if int(state.skipped_in_a_row) >= c.max_skipped_in_a_row:
            raise SystemExit(f"step {step}: {int(state.skipped_in_a_row)} steps in a row had a "
                             "non-finite loss or gradient, or no label tokens; stopping")
        tokens += int(np.sum(batch["segment_ids"] > 0))
        done = step + 1
        if ids_file is not None:
            ids_file.write(json.dumps({"step": done, "ids": batch["ids"],
                                       "loss": float(metrics["loss"])}) + "\n")
            ids_file.flush()
        if done % c.log_every == 0 or done == steps:
            m = jax.device_get(metrics)
            now = time.perf_counter()
            rate = done - start
            eta = (now - t0) / max(rate, 1) * (steps - done)
            rec = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                   "tokens_per_s": tokens / (now - t_last),
                   "data_wait_s": wait, "skipped_steps": int(state.skipped),
                   **skip_report(data_it).metrics()}
            history["loss"].append((done, rec["loss"]))
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            print(f"step {done}/{steps} loss {rec['loss']:.4f} grad {rec['grad_norm']:.3f} "
                  f"{rec['tokens_per_s']:.0f} tok/s data-wait {wait:.1f}s eta {eta:.0f}s",
                  flush=True)
            t_last, tokens, wait = now, 0, 0.0
        ckpt.save(done, state, data_it, force=done == steps)
        if ckpt.reached_preemption(done):
            ckpt.save(done, state, data_it, force=True)
            ckpt.wait()
            raise SystemExit(f"preempted at step {done}: checkpoint saved, exiting")
    log_file.close()
    if ids_file is not None:
        ids_file.close()
    history["state"] = state
    return history


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mmjax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/stage1.py[:VARIANT]")
    parser.add_argument("--workdir", required=True)
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    c = configlib.load(args.config, overrides)
    validate(c)
    return train(c, Path(args.workdir))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
