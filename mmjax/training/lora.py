"""LoRA for stage 2: trainable groups, the tree without its adapters (what a checkpoint without
LoRA holds), and merging the adapters back into the kernels for export and inference.

The adapters are ordinary parameters (`.../q_proj/lora_a`, `.../q_proj/lora_b`, created by
`mmjax.models.layers.Linear` when `RuntimeConfig.lora_rank > 0`), so training them is a
matter of optimizer groups: adapters at `lr`, the projector at `projector_lr`, all else frozen.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.models.config import LORA_TARGETS, RuntimeConfig

LORA_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA for stage 2 (LLaVA-1.5's LoRA recipe); enabled, it replaces optim.groups."""

    enabled: bool = False  # adapters at lr and the projector at projector_lr, all else frozen
    rank: int = 128  # adapter rank r
    alpha: float = 256.0  # scale alpha / r
    dropout: float = 0.05  # on the adapter input, training only
    lr: float = 2e-4  # peak learning rate of the adapters
    projector_lr: float = 2e-5  # peak learning rate of the projector
    targets: tuple[str, ...] = LORA_TARGETS  # the LLM's linear maps that get adapters

    def runtime(self, rt: RuntimeConfig) -> RuntimeConfig:
        """`rt` with this config's adapters (none when disabled)."""
        if not self.enabled:
            return dataclasses.replace(rt, lora_rank=0)
        return dataclasses.replace(rt, lora_rank=self.rank, lora_alpha=self.alpha,
                                   lora_dropout=self.dropout, lora_targets=self.targets)

    def groups(self) -> tuple[tuple[str, float | None], ...]:
        return tuple(groups(self.lr, self.projector_lr))


def groups(lr: float = 2e-4, projector_lr: float = 2e-5):
    """Optimizer groups for LoRA stage 2 (LLaVA-1.5's LoRA recipe: 2e-4 and 2e-5)."""
    return [("projector/.*", projector_lr), ("language_model/.*/lora_[ab]", lr), (".*", None)]


def strip(tree):
    """The tree without adapter leaves (what a checkpoint without LoRA holds)."""
    if not isinstance(tree, dict):
        return tree
    return {k: strip(v) for k, v in tree.items() if k not in LORA_KEYS}


def merge(params, rt: RuntimeConfig):
    """Folds every adapter into its kernel (W + alpha/r A B) and drops the adapters: the
    result runs with `rt` less its adapters (lora_rank 0) and gives the same outputs (no
    dropout)."""
    scale = rt.lora_alpha / rt.lora_rank if rt.lora_rank else 0.0

    def walk(node):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node and "lora_b" in node:
            kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
            lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 when scanned ('layers' axis first)
            delta = _product(a, b, lead).reshape(kernel.shape)
            merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
            return {k: (merged if k == "kernel" else walk(v)) for k, v in node.items()
                    if k not in LORA_KEYS}
        return {k: walk(v) for k, v in node.items()}

    return walk(params)


def _product(a, b, lead: int):
    f = lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), 1)  # noqa
    for _ in range(lead):
        f = jax.vmap(f)
    return f(a, b)
