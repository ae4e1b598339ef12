"""A finished (or running) training work dir, read back: its config, its model, its
parameters. The one place generation (`mmjax.inference.load`), export (`mmjax.export`) and
evaluation read a run from.

    run = SavedRun.open("runs/stage2")            # or "runs/stage2:1200" with parse()
    params = run.read_params(step, shardings)      # parameters only, no optimizer state
    fn = inference_params_fn(cfg, run.rt, inference_rt, mesh, rules)   # LoRA merged,
    params = fn(params)                                                # layers unstacked
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmjax import configlib
from mmjax.errors import ConfigError
from mmjax.hf import load_tokenizer
from mmjax.models import presets
from mmjax.models.config import LlavaConfig, RuntimeConfig
from mmjax.models.factory import abstract_variables
from mmjax.models.llm import unstack_layers
from mmjax.sharding import Rules, logical_shardings, plain, with_shardings
from mmjax.training import lora, model_spec
from mmjax.training.checkpoint import SubtreeReader, restore_subtree
from mmjax.training.config import TrainConfig
from mmjax.training.model_spec import ModelSpec


def parse(spec: str) -> tuple[Path, int | None]:
    """'WORKDIR' or 'WORKDIR:STEP'."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(spec), None


@dataclasses.dataclass
class SavedRun:
    workdir: Path
    tc: TrainConfig
    spec: ModelSpec  # the model, tokenizer and template the run trained

    @classmethod
    def open(cls, workdir: str | Path) -> "SavedRun":
        workdir = Path(workdir)
        saved = workdir / "config.json"
        if not saved.is_file():
            raise ConfigError(f"{workdir} is not a training work dir (no config.json); pass "
                              "the directory given to --workdir")
        tc = configlib.from_saved(TrainConfig, json.loads(saved.read_text()))
        if (workdir / model_spec.MODEL_FILE).is_file():
            spec = model_spec.read(workdir)
        else:  # a work dir from before runs saved their model: its preset and tokenizer
            spec = ModelSpec(presets.get(tc.model), load_tokenizer(
                tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm), tc.data.template)
        return cls(workdir, tc, spec)

    @property
    def cfg(self) -> LlavaConfig:
        return self.spec.cfg

    @property
    def rt(self) -> RuntimeConfig:
        """The runtime the run trained with (its LoRA adapters included)."""
        return self.tc.model_runtime

    @property
    def checkpoints(self) -> Path:
        return self.workdir / "checkpoints"

    def abstract_params(self):
        """The parameters' shapes as the run saved them (boxed with their logical axes)."""
        return abstract_variables(self.cfg, self.rt)["params"]

    def read_params(self, step: int | None, mesh: Mesh, rules: Rules):
        """The parameters of checkpoint `step` (None: the newest), placed on `mesh` as
        `rules` split them; no optimizer state is read."""
        boxed = self.abstract_params()
        abstract = with_shardings(plain(boxed), logical_shardings(boxed, mesh, rules))
        try:
            return restore_subtree(self.checkpoints, ("params",), abstract, step)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None

    def reader(self, step: int | None) -> SubtreeReader:
        """The checkpoint opened once, for reading it part by part (export)."""
        try:
            return SubtreeReader(self.checkpoints, step)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None


def inference_params_fn(cfg: LlavaConfig, trained: RuntimeConfig, inference: RuntimeConfig,
                        mesh: Mesh, rules: Rules, donate: bool = False):
    """A jitted function: trained parameters -> the parameters `Llava(cfg, inference)` runs
    (LoRA adapters merged into the kernels unless `inference` keeps them, scanned layers
    unstacked, cast to the inference dtype), laid out on `mesh` as `rules` split the
    inference model. `donate`: the trained parameters' buffers are reused (loading a run);
    not while training goes on with them (in-training evaluation)."""
    merge = bool(trained.lora_rank) and not inference.lora_rank
    target = logical_shardings(abstract_variables(cfg, inference)["params"], mesh, rules)

    def convert(params):
        if merge:
            params = lora.merge(params, trained)
        if trained.scan_layers:
            params = unstack_layers(params)
        return jax.tree.map(lambda a: a.astype(jnp.dtype(inference.param_dtype)), params)

    # donated buffers are reused only where every leaf keeps its place and shape (not when
    # layers are unstacked or adapters folded away)
    donate = donate and not trained.scan_layers and not merge
    return jax.jit(convert, out_shardings=target, donate_argnums=(0,) if donate else ())
