"""Rematerialisation policies by name, over the checkpoint names set in the model code.

Names the model marks with `checkpoint_name`: 'query_proj', 'key_proj', 'value_proj',
'context' (attention output before o_proj), 'mlp_hidden', 'layer_out'.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from mmjax.errors import ConfigError

_CP = jax.checkpoint_policies

POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": _CP.nothing_saveable,  # recompute the whole layer in the backward pass
    "save_dots": _CP.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "save_qkv": _CP.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_qkv_context": _CP.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "context"),
    "save_qkv_context_mlp": _CP.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "context", "mlp_hidden"),
}


# `auto` by platform. TPU: keep q, k, v (the attention's inputs) and recompute the rest;
# measured by `python -m mmjax.aot --sweep` (README "Will it fit?"): llava15_7b stage 2 on
# v5p-8 at grad_accum 2 takes 93.0 GiB of 95.7 (save_qkv_context: 100.5, does not fit;
# full: 66.8, recomputing every matmul). GPUs (80 GB) keep the attention output too. CPU
# runs keep everything.
AUTO = {"tpu": "save_qkv", "gpu": "save_qkv_context", "cpu": "none"}


def resolve_policy(policy: str, platform: str | None = None) -> str:
    """`auto` -> the platform's policy (default: the default backend's); others as named."""
    if policy != "auto":
        return policy
    return AUTO.get(platform or jax.default_backend(), "none")


def remat_block(layer_cls: type, policy: str, scanned: bool) -> type:
    """`layer_cls` wrapped in `nn.remat` with the named policy ('none' returns it as is)."""
    policy = resolve_policy(policy)
    if policy not in POLICIES:
        raise ConfigError(f"unknown remat_policy {policy!r}; known: auto, "
                          f"{', '.join(sorted(POLICIES))}")
    if policy == "none":
        return layer_cls
    # Under scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
    return nn.remat(layer_cls, policy=POLICIES[policy], prevent_cse=not scanned)
