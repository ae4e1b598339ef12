"""Initial parameters, in one place and in this order: an existing run (resume, handled by
the caller), a stage-1 checkpoint's parts, HF weights, random init."""
from __future__ import annotations

import logging
from pathlib import Path

import flax.linen as nn
import jax

from mmjax.hf import load as hf_load
from mmjax.training import lora
from mmjax.training.checkpoint import restore_subtree

log = logging.getLogger("mmjax.train")


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def _place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def initial_params(model, init_cfg, abstract_params, param_shardings, rt, mesh, rules,
                   rng_seed: int = 0):
    """Parameters for a fresh run, placed in `param_shardings`."""
    dummy = (jax.numpy.zeros((1, 8), jax.numpy.int32),
             jax.numpy.zeros((1, 1) + (model.cfg.vision.image_size,) * 2 + (3,)))
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(rng_seed), *dummy))["params"],
                     out_shardings=param_shardings)()
    if init_cfg.hf_llava:
        imported = hf_load(init_cfg.hf_llava, rt, mesh=mesh, rules=rules)
        _check_same_model(imported.config, model.cfg, init_cfg.hf_llava)
        params = lora.graft(dict(imported.params), params)
    else:
        if init_cfg.hf_vision:
            params["vision_tower"] = _vision_from_hf(init_cfg.hf_vision, params, rt, mesh, rules)
        if init_cfg.hf_llm:
            imported = hf_load(init_cfg.hf_llm, rt, mesh=mesh, rules=rules)
            params["language_model"] = lora.graft(imported.params, params["language_model"])
    if init_cfg.stage1_checkpoint:
        directory = _checkpoint_dir(init_cfg.stage1_checkpoint)
        # a stage-1 checkpoint has no LoRA adapters: read the rest, keep fresh adapters
        abstract = {part: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            lora.strip(abstract_params[part]), lora.strip(param_shardings[part]))
            for part in init_cfg.stage1_parts}
        loaded = restore_subtree(directory, ("params",), abstract)  # one read, all parts
        for part in init_cfg.stage1_parts:
            params[part] = lora.graft(loaded[part], params[part])
            log.info("%s: loaded from stage-1 checkpoint %s", part, directory)
    return params


def _vision_from_hf(directory, params, rt, mesh, rules):
    imported = hf_load(directory, rt, mesh=mesh, rules=rules)
    ours = params["vision_tower"]
    out = {}
    for key, value in ours.items():  # keep only the layers the LLaVA tower builds
        if key == "layers" and "layer" in value:  # scanned: [L, ...] stacks, keep the first
            out[key] = {"layer": jax.tree.map(
                lambda full, mine: jax.device_put(full[:mine.shape[0]], mine.sharding),
                imported.params["layers"]["layer"], value["layer"])}
        elif key == "layers":
            out[key] = {k: imported.params["layers"][k] for k in value}
        else:
            out[key] = imported.params[key]
    return out


def _check_same_model(imported_cfg, cfg, directory):
    if imported_cfg != cfg:
        raise ValueError(f"{directory} holds a model that differs from config.model: "
                         f"{imported_cfg} vs {cfg}")
