"""The train step: trainable groups, frozen parts untouched, gradient accumulation, sharded
equals unsharded, non-finite and empty batches skipped and counted."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jitted import init

from mmjax import batch as batch_format
from mmjax.models import Llava, presets
from mmjax.sharding import LOGICAL_AXIS_RULES as RULES
from mmjax.sharding import logical_shardings, make_mesh, mesh_rules, single_device_mesh
from mmjax.training.optimizer import OptimConfig, group_labels
from mmjax.training.step import StepConfig, Trainer, token_loss

CFG = presets.get("tiny")
MODEL = Llava(CFG)
STAGE2 = (("vision_tower/.*", None), ("projector/.*", 2e-3), ("language_model/.*", 1e-3))


def _batch(b=8, t=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 500, (b, t)).astype(np.int32)
    ids[:, 1:17] = CFG.image_token_id
    targets = np.where(np.arange(t) > 20, np.roll(ids, -1, 1), -100).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[1, 30:] = 0
    targets[1, 29:] = -100
    return {"input_ids": ids, "targets": targets, "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
            "pixel_values": rng.integers(0, 255, (b, 1, 56, 56, 3)).astype(np.uint8)}


def _setup(groups=STAGE2, mesh=None, accum=1, steps=20):
    mesh = mesh or single_device_mesh()
    trainer = Trainer(MODEL, OptimConfig(groups=groups, total_steps=steps, warmup_ratio=0.0),
                      StepConfig(grad_accum=accum))
    args = (jnp.zeros((1, 20), jnp.int32), jnp.zeros((1, 1, 56, 56, 3)))
    boxed = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), *args))["params"]
    shardings = trainer.state_shardings(logical_shardings(boxed, mesh, RULES), nn.unbox(boxed))
    with mesh_rules(mesh, RULES):
        state = jax.jit(lambda: trainer.create_state(
            nn.unbox(init(MODEL, jax.random.key(0), *args))["params"]),
            out_shardings=shardings)()
    step = trainer.jit_step(shardings, batch_format.shardings(mesh, RULES))
    return trainer, state, step, mesh


def _run(step, state, mesh, batches):
    losses = []
    with mesh_rules(mesh, RULES):
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
    return state, losses


def test_token_loss_is_mean_cross_entropy_over_targets():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.asarray([[1, -100, 4], [0, 2, -100]])
    total, count = token_loss(logits, targets)
    logp = jax.nn.log_softmax(logits)
    expect = -(logp[0, 0, 1] + logp[0, 2, 4] + logp[1, 0, 0] + logp[1, 1, 2])
    assert int(count) == 4 and float(total) == pytest.approx(float(expect), rel=1e-6)


def test_groups_must_cover_every_parameter():
    params = {"projector": {"w": 0}, "other": {"w": 0}}
    with pytest.raises(ValueError, match="match no optimizer group.*other/w"):
        group_labels(params, (("projector/.*", 1e-3),))


def test_frozen_parts_stay_put_and_have_no_optimizer_state():
    trainer, state, step, mesh = _setup(groups=(("projector/.*", 1e-3), (".*", None)))
    before = jax.device_get(state.params)
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_proj = sum(x.size for x in jax.tree.leaves(before["projector"]))
    assert n_opt <= 2 * n_proj + 8  # Adam moments of the projector only (+ counts)
    state, losses = _run(step, state, mesh, [_batch(seed=i) for i in range(3)])
    after = jax.device_get(state.params)
    for part in ("vision_tower", "language_model"):
        for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before["projector"]), jax.tree.leaves(after["projector"])))
    assert int(state.step) == 3


def test_loss_goes_down_on_a_fixed_batch():
    _, state, step, mesh = _setup()
    _, losses = _run(step, state, mesh, [_batch()] * 8)
    assert losses[-1] < losses[0] - 0.5


def test_gradient_accumulation_equals_one_big_batch():
    batches = [_batch(seed=i) for i in range(3)]
    _, s1, step1, mesh = _setup(accum=1)
    s1, l1 = _run(step1, s1, mesh, batches)
    _, s2, step2, _ = _setup(accum=4)
    s2, l2 = _run(step2, s2, mesh, batches)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_sharded_step_equals_single_device():
    batches = [_batch(seed=i) for i in range(3)]
    _, s1, step1, m1 = _setup()
    s1, l1 = _run(step1, s1, m1, batches)
    _, s8, step8, m8 = _setup(mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    q = s8.params["language_model"]["layers"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size // 4
    s8, l8 = _run(step8, s8, m8, batches)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(jax.device_get(s8.params))):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_non_finite_and_empty_batches_are_skipped_and_counted():
    _, state, step, mesh = _setup()
    empty = _batch()
    empty["targets"][:] = -100
    state, _ = _run(step, state, mesh, [_batch(), empty])
    assert int(state.step) == 1 and int(state.skipped) == 1
    assert int(state.skipped_in_a_row) == 1
    state, _ = _run(step, state, mesh, [_batch(), empty])
    assert int(state.step) == 2 and int(state.skipped) == 2 and int(state.skipped_in_a_row) == 1
    # poison one parameter: the loss turns NaN, the update is skipped, the state is kept
    params = jax.tree.map(np.array, jax.device_get(state.params))
    params["projector"]["linear_1"]["bias"][0] = np.nan
    state = jax.tree.map(np.array, jax.device_get(state)).replace(params=params)
    before = jax.tree.map(np.copy, params)
    state, m = step(state, _batch())
    assert bool(m["skipped"]) and int(state.skipped_in_a_row) == 2 and int(state.step) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk", [16, 24, 64])
def test_chunked_loss_equals_full_logits_loss_and_gradients(chunk):
    """The chunked cross-entropy (no float32 [B, T, V] logits) gives today's loss and
    gradients within 1e-6 in float32, chunks that do not divide T included."""
    from mmjax.models.llm import head_logits
    from mmjax.training.step import chunked_token_loss

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 40, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(16, 50)) * 0.3, jnp.float32)
    targets = rng.integers(0, 50, size=(3, 40)).astype(np.int32)
    targets[:, :7] = -100
    targets[2, 30:] = -100
    targets = jnp.asarray(targets)

    def full(h, w):
        total, count = token_loss(head_logits(h, w, jnp.float32), targets)
        return total / count

    def chunked(h, w):
        total, count = chunked_token_loss(h, w, targets, jnp.float32, chunk)
        return total / count

    # the reference: logits materialised, the target's logit gathered (the step before)
    def gathered(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w)
        mask = targets != -100
        picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], -1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, -1) - picked) * mask) / jnp.sum(mask)

    ref, ref_g = jax.value_and_grad(gathered, argnums=(0, 1))(hidden, weight)
    for fn in (full, chunked):
        val, g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, weight)
        np.testing.assert_allclose(val, ref, rtol=1e-6)
        for a, b in zip(g, ref_g):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_tied_embeddings_and_a_siglip_tower_train():
    """The step on a Qwen2-style LLM (qkv bias, one table for the input embedding and the
    output projection) under a SigLIP tower (no CLS, 'full' features): the one table gets
    the gradient of both its uses and the loss falls (the families' recipe tests build their
    runs without training; test_recipe.py trains LLaVA-1.5's pair end to end)."""
    import dataclasses

    base = presets.get("tiny_siglip")
    cfg = dataclasses.replace(base, llm=dataclasses.replace(
        base.llm, family="qwen2", qkv_bias=True, tie_word_embeddings=True))
    model = Llava(cfg)
    trainer = Trainer(model, OptimConfig(groups=STAGE2, total_steps=20, warmup_ratio=0.0))
    mesh = single_device_mesh()
    args = (jnp.zeros((1, 20), jnp.int32), jnp.zeros((1, 1, 56, 56, 3)))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    shardings = trainer.state_shardings(logical_shardings(boxed, mesh, RULES), nn.unbox(boxed))
    assert "lm_head" not in boxed["language_model"]
    batch = _batch()
    batch["input_ids"][:, 1:17] = cfg.image_token_id  # the SigLIP tower's 16 patches
    with mesh_rules(mesh, RULES):
        state = jax.jit(lambda: trainer.create_state(
            nn.unbox(init(model, jax.random.key(0), *args))["params"]),
            out_shardings=shardings)()
        before = jax.device_get(state.params["language_model"]["embed_tokens"])
        step = trainer.jit_step(shardings, batch_format.shardings(mesh, RULES))
        losses = []
        for _ in range(4):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    after = jax.device_get(state.params["language_model"]["embed_tokens"])
    assert losses[-1] < losses[0] and np.all(np.isfinite(losses))
    # rows only the output projection reads (never an input token here) moved too
    unused = np.setdiff1d(np.arange(cfg.llm.vocab_size), batch["input_ids"])
    assert np.any(after[unused] != before[unused])
