"""Building a network from its config, and its parameter shapes at no memory cost."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.config import LlavaConfig, LLMConfig, RuntimeConfig, VisionConfig
from mmjax.models.llava import Llava
from mmjax.models.llm import LLM
from mmjax.models.vision import VisionTower


def build(cfg, rt: RuntimeConfig = RuntimeConfig()):
    """The Flax module for a VisionConfig, LLMConfig or LlavaConfig."""
    cfg.validate()
    if isinstance(cfg, LlavaConfig):
        return Llava(cfg, rt)
    if isinstance(cfg, LLMConfig):
        return LLM(cfg, rt)
    if isinstance(cfg, VisionConfig):
        return VisionTower(cfg, rt)
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def dummy_inputs(cfg) -> tuple[tuple, dict]:
    """Smallest (args, kwargs) that create every parameter of `build(cfg)`."""
    if isinstance(cfg, VisionConfig):
        s = cfg.image_size
        return (jnp.zeros((1, s, s, 3), jnp.float32),), {"post_norm": True}
    ids = jnp.zeros((1, 8), jnp.int32)
    if isinstance(cfg, LLMConfig):
        return (ids,), {}
    s = cfg.vision.image_size
    if cfg.anyres:  # one slot of views, every token the first feature
        return (ids, jnp.zeros((1, 1, cfg.max_views, s, s, 3), jnp.float32)), {
            "image_sources": jnp.zeros((1, 8), jnp.int32)}
    return (ids, jnp.zeros((1, 1, s, s, 3), jnp.float32)), {}


def for_init(model):
    """The same network with the reference attention, for `init`: parameters do not depend
    on the attention kernel, and the dummy rows (8 tokens) need no kernel's block sizes."""
    return model.clone(rt=dataclasses.replace(model.rt, attention_impl="reference"))


def abstract_variables(cfg, rt: RuntimeConfig = RuntimeConfig()):
    """`{'params': ...}` as ShapeDtypeStructs inside their logical-partitioning boxes."""
    model = for_init(build(cfg, rt))
    args, kwargs = dummy_inputs(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))
