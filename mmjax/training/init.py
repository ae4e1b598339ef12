"""Initial parameters, in one place and in this order: an existing run (resume, handled by
the caller), a stage-1 checkpoint's parts, HF weights, random init."""
from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.hf import load as hf_load
from mmjax.models.factory import dummy_inputs, for_init
from mmjax.sharding import with_shardings
from mmjax.training import lora
from mmjax.training.checkpoint import restore_subtree

log = logging.getLogger("mmjax.train")
# fold_in tags of the random streams drawn from the run's seed (the step folds in step numbers)
GROW_VOCAB = 0x7f6b_0001


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where a fresh run's weights come from (local directories; README 'Hugging Face
    weights'). Parts no source provides are initialised randomly."""

    hf_llava: str = ""  # a whole LlavaForConditionalGeneration directory, or:
    hf_vision: str = ""  # CLIPVisionModel / SiglipVisionModel directory
    hf_llm: str = ""  # LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory
    stage1_checkpoint: str = ""  # stage 2: a stage-1 work dir (or its checkpoints/ dir)
    stage1_parts: tuple[str, ...] = ("projector",)  # what stage 2 takes from stage 1
    random: bool = False  # random init instead of HF weights (the demo)


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def initial_params(model, init_cfg: InitConfig, abstract_params, param_shardings, rt, mesh,
                   rules, rng_seed: int = 0):
    """Parameters for a fresh run, placed in `param_shardings`: what the weight sources give
    (HF towers or a whole LLaVA, then stage-1 parts), and a random init of only the rest
    (the projector, LoRA adapters; everything for `init.random`)."""
    loaded = {}  # part -> subtree, without LoRA adapters
    from_stage1 = set(init_cfg.stage1_parts) if init_cfg.stage1_checkpoint else set()
    if init_cfg.random:
        pass
    elif init_cfg.hf_llava and not {"vision_tower", "language_model"} <= from_stage1:
        imported = hf_load(init_cfg.hf_llava, rt, mesh=mesh, rules=rules)
        _check_same_model(imported.config, model.cfg, init_cfg.hf_llava)
        loaded.update(imported.params)
    else:
        if init_cfg.hf_vision and "vision_tower" not in from_stage1:
            loaded["vision_tower"] = _vision_from_hf(
                init_cfg.hf_vision, abstract_params["vision_tower"],
                param_shardings["vision_tower"], rt, mesh, rules)
        if init_cfg.hf_llm and "language_model" not in from_stage1:
            llm = hf_load(init_cfg.hf_llm, rt, mesh=mesh, rules=rules).params
            loaded["language_model"] = grow_vocab(
                llm, model.cfg.llm.vocab_size, param_shardings["language_model"], rng_seed)
    if init_cfg.stage1_checkpoint:
        directory = _checkpoint_dir(init_cfg.stage1_checkpoint)
        # a stage-1 checkpoint has no LoRA adapters: read the rest, keep fresh adapters
        abstract = {part: with_shardings(lora.strip(abstract_params[part]),
                                         lora.strip(param_shardings[part]))
                    for part in init_cfg.stage1_parts}
        loaded.update(restore_subtree(directory, ("params",), abstract))  # one read
        for part in init_cfg.stage1_parts:
            log.info("%s: loaded from stage-1 checkpoint %s", part, directory)
    return _complete(model, loaded, abstract_params, param_shardings, rng_seed)


def _flat(tree) -> dict[tuple[str, ...], object]:
    return {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _complete(model, loaded, abstract_params, param_shardings, rng_seed: int):
    """`loaded` plus a random init of every parameter it lacks. Only those leaves are
    computed: the jitted init returns just them and XLA drops the rest, so a 7B model whose
    towers come from HF weights never materialises a random copy of them."""
    have, want, shardings = _flat(loaded), _flat(abstract_params), _flat(param_shardings)
    for path, leaf in have.items():
        name = "/".join(path)
        if path not in want:
            raise ValueError(f"{name} was loaded but the model has no such parameter")
        if tuple(leaf.shape) != tuple(want[path].shape):
            raise ValueError(f"{name}: loaded shape {tuple(leaf.shape)}, the model "
                             f"({model.cfg.llm.family}) needs {tuple(want[path].shape)}")
    missing = [p for p in want if p not in have]
    if missing:
        args, kwargs = dummy_inputs(model.cfg)

        def init_missing():
            params = _flat(nn.unbox(for_init(model).init(jax.random.key(rng_seed), *args,
                                                         **kwargs))["params"])
            return [params[p] for p in missing]

        fresh = jax.jit(init_missing, out_shardings=[shardings[p] for p in missing])()
        have.update(zip(missing, fresh))
        log.info("random init: %d of %d parameter arrays", len(missing), len(want))
    return _unflat({p: have[p] for p in want})


def grow_vocab(llm: dict, vocab: int, shardings: dict, seed: int) -> dict:
    """The LLM's embedding table (and untied output head) grown to `vocab` rows for the
    tokens a run added: each new row drawn from N(mean, 1e-5 x covariance) of the existing
    rows, as llava-hf's conversion does (the mean alone when the covariance is singular).
    A tied model stays tied: its one table grows."""
    old = llm["embed_tokens"].shape[0]
    if old == vocab:
        return llm
    if old > vocab:
        raise ValueError(f"the LLM has {old} embedding rows, the model {vocab}")
    k_in, k_out = jax.random.split(jax.random.fold_in(jax.random.key(seed), GROW_VOCAB))
    out = dict(llm)
    out["embed_tokens"] = jax.jit(partial(_grown, n=vocab - old),
                                  out_shardings=shardings["embed_tokens"])(
        llm["embed_tokens"], k_in)
    if "lm_head" in llm:  # [D, V]: grown along V
        head = dict(llm["lm_head"])
        head["kernel"] = jax.jit(lambda k, key: _grown(k.T, key, vocab - old).T,
                                 out_shardings=shardings["lm_head"]["kernel"])(
            llm["lm_head"]["kernel"], k_out)
        out["lm_head"] = head
    log.info("vocabulary %d -> %d: new embedding rows drawn from the existing rows' mean and "
             "covariance", old, vocab)
    return out


def _grown(table, key, n: int):
    """[V, D] -> [V + n, D]."""
    x = table.astype(jnp.float32)
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / x.shape[0]
    chol = jnp.linalg.cholesky(1e-5 * cov)
    rows = mean + jax.random.normal(key, (n, x.shape[1])) @ chol.T
    rows = jnp.where(jnp.all(jnp.isfinite(chol)), rows, mean)
    return jnp.concatenate([table, rows.astype(table.dtype)], axis=0)


def _vision_from_hf(directory, abstract, shardings, rt, mesh, rules):
    """A standalone HF tower cut to the layers the LLaVA tower builds."""
    imported = hf_load(directory, rt, mesh=mesh, rules=rules).params
    out = {}
    for key, value in abstract.items():
        if key == "layers" and "layer" in value:  # scanned: [L, ...] stacks, keep the first
            out[key] = {"layer": jax.tree.map(
                lambda full, mine, sh: jax.device_put(full[:mine.shape[0]], sh),
                imported["layers"]["layer"], value["layer"], shardings["layers"]["layer"])}
        elif key == "layers":
            out[key] = {k: imported["layers"][k] for k in value}
        else:
            out[key] = imported[key]
    return out


def _check_same_model(imported_cfg, cfg, directory):
    if cfg.anyres and not imported_cfg.anyres:  # stage 2 adds any resolution (llava.aspect)
        imported_cfg = dataclasses.replace(imported_cfg,
                                           image_grid_pinpoints=cfg.image_grid_pinpoints)
    if imported_cfg != cfg:
        raise ValueError(f"{directory} holds a model that differs from config.model: "
                         f"{imported_cfg} vs {cfg}")
