"""Training work dirs built directly, without training: what a run leaves behind (config.json,
model.json, tokenizer/, a checkpoint of the train state) from a config, with the step's own
setup and random (or given) parameters. Tests of what reads a run (generation, export,
evaluation) start from these; the end-to-end tests train for real.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from mmjax import configlib
from mmjax.sharding import mesh_rules
from mmjax.training import model_spec
from mmjax.training.checkpoint import CheckpointConfig, Checkpointer
from mmjax.training.config import TrainConfig, from_config
from mmjax.training.init import initial_params
from mmjax.training.run import StepSetup

ROOT = Path(__file__).resolve().parent.parent


def demo_config(data: Path, stage: int = 2, extra=()) -> TrainConfig:
    """configs/stage{stage}.py:demo on the demo data in `data` (random init, no stage 1)."""
    split = "captions" if stage == 1 else "instruct"
    sources = [{"kind": "llava_json", "path": str(data / f"train_{split}.json"),
                "image_root": str(data), "weight": 1.0}]
    c = configlib.load(f"{ROOT}/configs/stage{stage}.py:demo", [
        "--config.total_steps=1", f"--config.tokenizer={data / 'tokenizer'}",
        f"--config.data.sources={sources!r}", *extra])
    c.init.stage1_checkpoint = ""
    return from_config(c)


def make_run(workdir: Path, tc: TrainConfig, step: int = 1, perturb: float = 0.0) -> Path:
    """A work dir as `mmjax.train` leaves it after `step` steps, with the initial parameters
    (LoRA adapters moved off zero by `perturb`, so that merging them matters)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = tc.make_mesh()
    tc = tc.for_mesh(mesh)
    spec = model_spec.resolve(tc)
    model_spec.save(spec, workdir)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
    setup = StepSetup.of(tc, spec.cfg, mesh, step)
    with mesh_rules(mesh, tc.logical_axis_rules):
        params = initial_params(setup.model, tc.init, setup.abstract_params, setup.param_sh,
                                setup.rt, mesh, tc.logical_axis_rules, tc.seed)
        if perturb:
            params = _perturb_lora(params, perturb)
        state = jax.jit(setup.trainer.create_state, out_shardings=setup.state_sh)(params)
        state = state.replace(step=state.step + step)
        ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(async_save=False))
        ckpt.save(step, state, force=True)
        ckpt.wait()
        ckpt.close()
    return workdir


def _perturb_lora(params, scale: float):
    def walk(path, x):
        name = jax.tree_util.keystr(path)
        if "lora_b" in name:
            key = jax.random.fold_in(jax.random.key(7), hash(name) % (1 << 30))
            return x + scale * jax.random.normal(key, x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(walk, params)
