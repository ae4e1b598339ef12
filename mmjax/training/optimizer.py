"""What trains, at which learning rate: regexes over parameter paths -> groups -> optax.

A group is `(regex, lr)`: the first regex that matches a parameter path ('a/b/c') decides its
group; `lr=None` freezes it. Frozen parameters get no gradient and no optimizer state at all
(the step differentiates only the trainable subtree), which is what makes stage 1 (projector
only) cheap.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW per trainable group after global-norm clipping; warmup then cosine."""

    groups: tuple[tuple[str, float | None], ...] = ((".*", None),)  # (path regex, peak lr | None)
    warmup_ratio: float = 0.03  # share of total steps spent warming up linearly from 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    b1: float = 0.9  # Adam beta 1
    b2: float = 0.999  # Adam beta 2
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup
    mu_dtype: Literal["float32", "bfloat16"] = "float32"  # Adam's 1st moment; bf16: 2 B/param less
    total_steps: int = dataclasses.field(default=0, metadata={
        "derived": "total_steps, or num_epochs over the data"})


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_labels(params, groups: Sequence[tuple[str, float | None]]):
    """Tree of group indices (or -1 for frozen) matching `params`; errors on unmatched paths."""
    compiled = [(re.compile(rx), lr) for rx, lr in groups]
    unmatched = []

    def label(path, _):
        p = path_str(path)
        for i, (rx, lr) in enumerate(compiled):
            if rx.fullmatch(p):
                return -1 if lr is None else i
        unmatched.append(p)
        return -1

    labels = jax.tree_util.tree_map_with_path(label, params)
    if unmatched:
        raise ValueError(f"parameters match no optimizer group: {unmatched[:5]} "
                         f"({len(unmatched)} in all); add a group such as ('.*', None)")
    return labels


def split(params, labels):
    """(trainable, frozen) trees: each keeps the other's leaves as None."""
    trainable = jax.tree.map(lambda p, g: p if g >= 0 else None, params, labels)
    frozen = jax.tree.map(lambda p, g: None if g >= 0 else p, params, labels)
    return trainable, frozen


def merge(trainable, frozen):
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def schedule(cfg: OptimConfig, peak: float) -> optax.Schedule:
    warmup = max(1, int(round(cfg.warmup_ratio * cfg.total_steps)))
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.constant_schedule(peak)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.total_steps, warmup + 1))


def make_optimizer(cfg: OptimConfig, trainable_labels) -> optax.GradientTransformation:
    """AdamW per group (own peak lr, shared warmup + cosine), after global-norm clipping."""
    used = sorted({g for g in jax.tree.leaves(trainable_labels) if g >= 0})
    transforms = {
        g: optax.adamw(schedule(cfg, cfg.groups[g][1]), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mu_dtype=cfg.mu_dtype)
        for g in used}
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    return optax.chain(*chain, optax.multi_transform(transforms, trainable_labels))


def group_name(regex: str) -> str:
    """A metric-safe name for a group: 'projector/.*' -> 'projector', '.*' -> 'all'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", regex).strip("_") or "all"


def learning_rates(cfg: OptimConfig, step) -> dict[str, jax.Array]:
    """{'lr/GROUP': learning rate at `step`} for every trained group."""
    return {f"lr/{group_name(rx)}": schedule(cfg, lr)(step) for rx, lr in cfg.groups
            if lr is not None}
