"""Train state, its sharded initialisation, and the one pure train step.

Axis legend: B rows, T length, V vocabulary, A gradient-accumulation micro-batches.

`train_step(state, batch) -> (state, metrics)` is jitted with declared shardings and the
state donated. Only the trainable subtree is differentiated and has optimizer state; a
non-finite loss or gradient, or a batch with no label tokens, leaves the state unchanged and
is counted (`state.skipped_in_a_row` lets the loop stop after K in a row).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmjax.batch import IGNORE, device_pixels
from mmjax.models.llm import head_logits
from mmjax.training.optimizer import OptimConfig, group_labels, make_optimizer, merge, split


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied
    params: Any  # the full parameter tree
    opt_state: Any  # optimizer state of the trainable subtree
    skipped: jax.Array  # int32: non-finite or empty steps so far
    skipped_in_a_row: jax.Array  # int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1  # micro-batches per step (split along B)
    seed: int = 0  # dropout keys (LoRA) derive from (seed, step, micro-batch): resumable


def token_loss(logits, targets):
    """Summed next-token cross-entropy over non-ignored targets, and their count.

    logits [B, T, V] float32, targets [B, T]. The target's logit is picked by a masked sum
    (elementwise, exact; not a matmul, which TPUs run in bfloat16 passes), not a gather:
    its gradient is then a fused select instead of a scatter-add into a [B, T, V] buffer."""
    mask = targets != IGNORE
    logz = jax.nn.logsumexp(logits, axis=-1)
    hit = jnp.arange(logits.shape[-1]) == jnp.where(mask, targets, -1)[..., None]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def chunked_token_loss(hidden, weight, targets, dtype, chunk: int):
    """`token_loss` of the logits `hidden @ weight` without materialising them: the rows'
    positions go through in chunks of `chunk` (logits [B, chunk, V] at a time), each chunk
    rematerialised in the backward pass, so neither pass holds float32 [B, T, V].

    hidden [B, T, D] final hidden states, weight [D, V], targets [B, T]; chunk 0 = whole
    rows (one chunk). Equal to `token_loss(head_logits(hidden, weight))`."""
    b, t, d = hidden.shape
    if not chunk or chunk >= t:
        return token_loss(head_logits(hidden, weight, dtype), targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    hs = jnp.swapaxes(hidden.reshape(b, n, chunk, d), 0, 1)  # [n, B, C, D]
    ts = jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1)  # [n, B, C]

    @jax.checkpoint
    def one(h, tg):
        return token_loss(head_logits(h, weight, dtype), tg)

    def body(carry, xs):
        total, count = one(*xs)
        return (carry[0] + total, carry[1] + count), None

    (total, count), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (hs, ts))
    return total, count


class Trainer:
    """Binds a model, its trainable groups and optimizer; builds the jitted init and step."""

    def __init__(self, model: nn.Module, optim: OptimConfig, step_cfg: StepConfig = StepConfig()):
        self.model, self.optim, self.step_cfg = model, optim, step_cfg
        self.vision = model.cfg.vision

    # ----------------------------------------------------------------------------- init
    def labels(self, params):
        return group_labels(params, self.optim.groups)

    def tx(self, params):
        labels = self.labels(params)
        return make_optimizer(self.optim, split(labels, labels)[0])

    def create_state(self, params) -> TrainState:
        trainable, _ = split(params, self.labels(params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx(params).init(trainable),
                          skipped=jnp.zeros((), jnp.int32),
                          skipped_in_a_row=jnp.zeros((), jnp.int32))

    def state_shardings(self, params_shardings, abstract_params):
        """Shardings of the state: optimizer moments follow their parameters."""
        abstract = jax.eval_shape(self.create_state, abstract_params)
        trainable_sh = split(params_shardings, self.labels(abstract_params))[0]
        mesh = jax.tree.leaves(params_shardings)[0].mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_sh = _opt_state_shardings(abstract.opt_state, trainable_sh, replicated)
        return TrainState(step=replicated, params=params_shardings, opt_state=opt_sh,
                          skipped=replicated, skipped_in_a_row=replicated)

    # ----------------------------------------------------------------------------- step
    def loss(self, params, micro: dict, rngs=None):
        """Summed token loss and label count of a (micro-)batch: the model's final hidden
        states and the output projection in chunks (`runtime.loss_chunk`)."""
        rt = self.model.rt
        pixels = device_pixels(micro["pixel_values"], self.vision)
        hidden = self.model.apply({"params": params}, micro["input_ids"], pixels,
                                  micro["positions"], micro["segment_ids"], head=False,
                                  rngs=rngs, image_sources=micro.get("image_sources"),
                                  image_weights=micro.get("image_weights")).hidden
        weight = self.model.apply({"params": params}, method="head_weight")
        return chunked_token_loss(hidden, weight, micro["targets"], rt.dtype, rt.loss_chunk)

    def loss_and_grads(self, trainable, frozen, batch, key):
        rt = self.model.rt
        dropout = bool(rt.lora_rank and rt.lora_dropout)

        def loss_fn(t, micro, k):
            params = merge(t, frozen)
            return self.loss(params, micro, rngs={"dropout": k} if dropout else None)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        a = self.step_cfg.grad_accum
        if a == 1:
            (total, count), grads = grad_fn(trainable, batch, key)
        else:
            # strided split (row i goes to micro-batch i % a) keeps every micro-batch spread
            # over the batch-sharded devices
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1),
                batch)

            def body(carry, xs):
                (t_sum, c_sum, g_sum) = carry
                mb, k = xs
                (t, c), g = grad_fn(trainable, mb, k)
                return (t_sum + t, c_sum + c, jax.tree.map(jnp.add, g_sum, g)), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (total, count, grads), _ = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros),
                (micro, jax.random.split(key, a)))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        return total / denom, count, jax.tree.map(lambda g: g / denom, grads)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        labels = self.labels(state.params)
        trainable, frozen = split(state.params, labels)
        key = jax.random.fold_in(jax.random.key(self.step_cfg.seed), state.step + state.skipped)
        loss, count, grads = self.loss_and_grads(trainable, frozen, batch, key)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (count > 0)
        tx = make_optimizer(self.optim, split(labels, labels)[0])
        updates, new_opt = tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa
        new_state = TrainState(
            step=state.step + ok.astype(jnp.int32),
            params=merge(keep(new_trainable, trainable), frozen),
            opt_state=keep(new_opt, state.opt_state),
            skipped=state.skipped + (~ok).astype(jnp.int32),
            skipped_in_a_row=jnp.where(ok, 0, state.skipped_in_a_row + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "label_tokens": count,
                   "real_tokens": jnp.sum(batch["segment_ids"] > 0),
                   "slot_tokens": jnp.int32(batch["input_ids"].size),
                   "image_slots": jnp.int32(math.prod(batch["pixel_values"].shape[:-3])),
                   "images": self.images(batch),
                   "skipped_in_a_row": new_state.skipped_in_a_row,
                   "param_norm": optax.tree.norm(new_trainable), "skipped": ~ok}
        return new_state, metrics

    def images(self, batch: dict) -> jax.Array:
        """How many images the batch's rows hold (any resolution: how many views, the
        tower's unit of work, whose features some token takes)."""
        cfg = self.model.cfg
        is_image = batch["input_ids"] == cfg.image_token_id
        if not cfg.anyres:
            return jnp.sum(is_image) // cfg.image_tokens
        b, slots = batch["pixel_values"].shape[:2]
        views = slots * cfg.max_views
        if cfg.video_token_id >= 0:
            is_image |= batch["input_ids"] == cfg.video_token_id
        sources = batch["image_sources"]
        if sources.ndim == 3:  # OneVision's taps: [B, T, K] -> [B, T*K]
            is_image = jnp.repeat(is_image, sources.shape[-1], axis=1)
            sources = sources.reshape(b, -1)
        view = jnp.where(is_image, sources // cfg.view_tokens, views)  # [B, T]
        used = jnp.zeros((b, views + 1), bool).at[jnp.arange(b)[:, None], view].set(True)
        return jnp.sum(used[:, :views])

    def eval_loss(self, params, batch: dict) -> dict:
        """Summed next-token loss and label-token count of a batch (no dropout), in
        `grad_accum` micro-batches like the step, so it fits wherever the step does."""
        def one(micro):
            return self.loss(params, micro)

        a = self.step_cfg.grad_accum
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1), batch)
        totals, counts = jax.lax.map(one, micro)
        return {"loss_sum": jnp.sum(totals), "label_tokens": jnp.sum(counts)}

    def jit_eval(self, params_shardings, batch_sharding) -> Callable:
        return jax.jit(self.eval_loss, in_shardings=(params_shardings, batch_sharding))

    def jit_step(self, state_shardings, batch_sharding) -> Callable:
        return jax.jit(self.train_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)


def _opt_state_shardings(abstract_opt_state, param_shardings, replicated):
    """Adam moments take their parameter's sharding; counts and other scalars replicate.

    A moment's key path ends with its parameter's path (optax nests them under
    chain / multi_transform / masked states), which is how the two are matched.
    """
    by_path = {tuple(k.key for k in path): sh for path, sh in
               jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def pick(path, leaf):
        tail = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            tail.insert(0, k.key)
        sh = by_path.get(tuple(tail))
        return sh if sh is not None and getattr(leaf, "ndim", 0) > 0 else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
