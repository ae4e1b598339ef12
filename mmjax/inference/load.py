"""A model to generate with: from a local Hugging Face LLaVA directory or a training work dir.

Either way the result is the network (unscanned, LoRA merged, in the inference dtype) with
its parameters placed on an inference mesh, the tokenizer, and the conversation template
the model expects.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax
import numpy as np

from mmjax import configlib
from mmjax.data.templates import IMAGE, get_template
from mmjax.data.tokenize import ConversationEncoder
from mmjax.hf import load as hf_load
from mmjax.hf import load_tokenizer
from mmjax.models import Llava
from mmjax.models.attention import available_implementations
from mmjax.models.config import ConfigError, LlavaConfig, RuntimeConfig
from mmjax.models.factory import abstract_variables
from mmjax.models.llm import unstack_layers
from mmjax.sharding import logical_shardings, make_mesh, plain

RAW = "raw"  # the prompt is given as the model's text, each <image> expanded


@dataclasses.dataclass
class Loaded:
    model: Llava
    params: dict
    tokenizer: object
    template: str  # a template name, or 'raw'
    model_id: str
    mesh: object
    rules: tuple
    image_aspect: str = "pad"  # how images are brought to the tower's square

    @property
    def cfg(self) -> LlavaConfig:
        return self.model.cfg

    def encoder(self) -> ConversationEncoder | None:
        """The conversation encoder of the template (None for 'raw' prompts)."""
        if self.template == RAW:
            return None
        return ConversationEncoder(self.tokenizer, get_template(self.template, self.tokenizer),
                                   self.cfg.image_tokens, self.cfg.image_token_id, 1 << 30,
                                   special_token_text="keep")

    def stop_ids(self) -> list[int]:
        return stop_ids(self.tokenizer, self.template)

    def raw_prompt_ids(self, text: str) -> np.ndarray:
        """The prompt text tokenized as given (with the tokenizer's BOS), each <image>
        expanded to the image tokens."""
        ids: list[int] = []
        for k, piece in enumerate(text.split(IMAGE)):
            if k:
                ids += [self.cfg.image_token_id] * self.cfg.image_tokens
            ids += self.tokenizer.encode(piece, add_special_tokens=k == 0)
        return np.asarray(ids, np.int32)


def stop_ids(tokenizer, template: str) -> list[int]:
    """What ends a reply: the tokenizer's EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    if template != RAW:
        eot = get_template(template, tokenizer).end_of_turn
        if eot:
            ids.append(tokenizer.convert_tokens_to_ids(eot))
    return [i for i in ids if i is not None]


def default_dtype() -> str:
    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def default_attention(dtype: str) -> str:
    impls = available_implementations()
    return "cudnn" if "cudnn" in impls and dtype in ("bfloat16", "float16") else "reference"


def inference_mesh(cfg: LlavaConfig, devices=None):
    """All devices: the key/value heads split over 'tensor' as far as they divide, the rest
    over 'data' (rows)."""
    devices = list(jax.devices() if devices is None else devices)
    tensor = math.gcd(len(devices), cfg.llm.num_kv_heads)
    return make_mesh({"data": len(devices) // tensor, "fsdp": 1, "tensor": tensor}, devices)


def default_rules() -> tuple:
    from configs.common import LOGICAL_AXIS_RULES

    return tuple(LOGICAL_AXIS_RULES)


def from_hf(directory: str | Path, dtype: str | None = None, template: str = "auto",
            devices=None) -> Loaded:
    """A LLaVA checkpoint directory (LlavaForConditionalGeneration layout) with its
    tokenizer."""
    from mmjax.hf.config import architecture
    from mmjax.hf.weight_files import Checkpoint

    directory = Path(directory)
    arch = architecture(Checkpoint(directory).config(), str(directory / "config.json"))
    if "Llava" not in arch:
        raise ConfigError(f"{directory} holds a {arch}, not a LLaVA model "
                          "(LlavaForConditionalGeneration)")
    dtype = dtype or default_dtype()
    rt = RuntimeConfig(dtype=dtype, param_dtype=dtype, attention_impl=default_attention(dtype))
    from mmjax.hf.config import from_hf as config_from_hf

    cfg = config_from_hf(Checkpoint(directory).config(), directory)
    mesh, rules = inference_mesh(cfg, devices), default_rules()
    imported = hf_load(directory, rt, mesh, rules)
    tokenizer = load_tokenizer(directory)
    if template == "auto":
        template = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    return Loaded(imported.model, imported.params, tokenizer, template, directory.name, mesh,
                  rules)


def parse_checkpoint(spec: str) -> tuple[Path, int | None]:
    """'WORKDIR' or 'WORKDIR:STEP'."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(spec), None


def from_checkpoint(spec: str, dtype: str | None = None, template: str = "auto",
                    devices=None, merge_lora: bool = True) -> Loaded:
    """A training work dir's parameters only (the newest checkpoint, or STEP; no optimizer
    state is read), placed on an inference mesh over `devices`, with the model, tokenizer
    and template the run saved (`WORKDIR/model.json`, `WORKDIR/tokenizer/`); LoRA adapters
    merged into the kernels unless `merge_lora` is False."""
    from mmjax.training import lora
    from mmjax.training import recipe as recipe_lib
    from mmjax.training.checkpoint import restore_subtree
    from mmjax.training.config import TrainConfig

    workdir, step = parse_checkpoint(spec)
    saved = workdir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"{workdir} is not a training work dir (no config.json); pass the "
                          "directory given to --workdir")
    tc = configlib.from_saved(TrainConfig, json.loads(saved.read_text()))
    if (workdir / recipe_lib.MODEL_FILE).is_file():
        recipe = recipe_lib.read(workdir)
    else:  # a work dir from before runs saved their model: its preset and tokenizer
        recipe = recipe_lib.Recipe(configlib.model(tc), load_tokenizer(
            tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm), tc.data.template)
    cfg = recipe.cfg
    train_rt = tc.model_runtime
    mesh, rules = inference_mesh(cfg, devices), tc.logical_axis_rules or default_rules()
    boxed = abstract_variables(cfg, train_rt)["params"]
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            plain(boxed), shardings)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Orbax's notices about opening read-only
    try:
        params = restore_subtree(workdir / "checkpoints", ("params",), abstract, step)
    finally:
        absl.setLevel(level)
    keep_lora = bool(train_rt.lora_rank) and not merge_lora
    if train_rt.lora_rank and merge_lora:
        params = lora.merge(params, train_rt)
    if train_rt.scan_layers:
        params = unstack_layers(params)
    dtype = dtype or default_dtype()
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    rt = RuntimeConfig(dtype=dtype, param_dtype=dtype, attention_impl=default_attention(dtype))
    if keep_lora:
        rt = dataclasses.replace(rt, lora_rank=train_rt.lora_rank,
                                 lora_alpha=train_rt.lora_alpha,
                                 lora_targets=train_rt.lora_targets)
    if template == "auto":
        template = recipe.template
    return Loaded(Llava(cfg, rt), params, recipe.tokenizer, template,
                  f"{workdir.name}" + (f":{step}" if step is not None else ""), mesh, rules,
                  image_aspect=tc.data.image_aspect)


def load(hf: str | None = None, checkpoint: str | None = None, **kwargs) -> Loaded:
    if bool(hf) == bool(checkpoint):
        raise ConfigError("pass one of --hf DIR or --checkpoint WORKDIR[:STEP]")
    return from_hf(hf, **kwargs) if hf else from_checkpoint(checkpoint, **kwargs)
