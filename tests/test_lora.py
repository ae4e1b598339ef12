"""LoRA: adapters start as the identity update, train alone (with the projector), merge back
into the kernels exactly, use dropout only in training, and graft onto imported HF weights."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jitted import forward, init

import hf_fixtures as hf
from mmjax import batch as batch_format
from mmjax.models import Llava, RuntimeConfig, presets
from mmjax.sharding import LOGICAL_AXIS_RULES as RULES
from mmjax.sharding import logical_shardings, mesh_rules, single_device_mesh
from mmjax.training import lora
from mmjax.training.init import InitConfig, initial_params
from mmjax.training.optimizer import OptimConfig, path_str
from mmjax.training.step import StepConfig, Trainer

CFG = presets.get("tiny")
RT = RuntimeConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.05)
ARGS = (jnp.zeros((1, 20), jnp.int32), jnp.zeros((1, 1, 56, 56, 3)))


def _batch(b=4, t=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 500, (b, t)).astype(np.int32)
    ids[:, 1:17] = CFG.image_token_id
    targets = np.where(np.arange(t) > 20, np.roll(ids, -1, 1), -100).astype(np.int32)
    return {"input_ids": ids, "targets": targets, "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
            "pixel_values": rng.integers(0, 255, (b, 1, 56, 56, 3)).astype(np.uint8)}


def _params(rt, seed=0):
    return nn.unbox(init(Llava(CFG, rt), jax.random.key(seed), *ARGS))["params"]


def _lora_paths(params):
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if "lora_" in path_str(p)]


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_start_at_zero_and_merge_exactly(scan):
    rt = dataclasses.replace(RT, scan_layers=scan)
    params = _params(rt)
    paths = _lora_paths(params)
    # 7 targeted maps x 2 adapters (x layers when unscanned), only in the LLM
    layers = 1 if scan else CFG.llm.num_layers
    assert len(paths) == 14 * layers and all(p.startswith("language_model/") for p in paths)
    b = _batch()
    no_lora = dataclasses.replace(rt, lora_rank=0)
    base = forward(Llava(CFG, no_lora), {"params": lora.strip(params)}, b["input_ids"],
                                     b["pixel_values"] / 255.0).logits
    with_lora = forward(Llava(CFG, rt), {"params": params}, b["input_ids"],
                                     b["pixel_values"] / 255.0).logits
    np.testing.assert_array_equal(base, with_lora)  # B = 0: the adapters change nothing yet
    # give B values, then merging W + alpha/r A B must give the adapted model's outputs
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
        if path_str(p).endswith("lora_b") else x, params)
    adapted = forward(Llava(CFG, rt), {"params": params}, b["input_ids"],
                                   b["pixel_values"] / 255.0).logits
    merged = lora.merge(params, rt)
    assert not _lora_paths(merged)
    out = forward(Llava(CFG, no_lora), {"params": merged}, b["input_ids"],
                  b["pixel_values"] / 255.0).logits
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3  # the adapters do something
    np.testing.assert_allclose(out, adapted, atol=2e-5, rtol=2e-5)
    # dropout only with a 'dropout' rng: two keys give two results
    k1 = forward(Llava(CFG, rt), {"params": params}, b["input_ids"], b["pixel_values"] / 255.0,
                              rngs={"dropout": jax.random.key(1)}).logits
    k2 = forward(Llava(CFG, rt), {"params": params}, b["input_ids"], b["pixel_values"] / 255.0,
                              rngs={"dropout": jax.random.key(2)}).logits
    assert float(jnp.max(jnp.abs(k1 - k2))) > 0


def test_lora_step_trains_adapters_and_projector_only():
    model = Llava(CFG, RT)
    trainer = Trainer(model, OptimConfig(groups=tuple(lora.groups(1e-2, 1e-3)), total_steps=10,
                                         warmup_ratio=0.0), StepConfig(seed=3))
    mesh = single_device_mesh()
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *ARGS))["params"]
    shardings = trainer.state_shardings(logical_shardings(boxed, mesh, RULES), nn.unbox(boxed))
    with mesh_rules(mesh, RULES):
        state = jax.jit(trainer.create_state, out_shardings=shardings)(_params(RT))
        before = jax.device_get(state.params)
        step = trainer.jit_step(shardings, batch_format.shardings(mesh, RULES))
        losses = []
        for _ in range(4):
            state, m = step(state, _batch(seed=0))
            losses.append(float(m["loss"]))
    after = jax.device_get(state.params)
    assert losses[-1] < losses[0]
    changed = {path_str(p) for (p, x), (_, y) in zip(
        jax.tree_util.tree_flatten_with_path(before)[0],
        jax.tree_util.tree_flatten_with_path(after)[0]) if not np.array_equal(x, y)}
    assert changed, "nothing trained"
    for p in changed:
        assert p.startswith("projector/") or p.endswith(("lora_a", "lora_b")), p
    assert any(p.endswith("lora_b") for p in changed)
    trainable = jax.tree.leaves(state.opt_state)
    n_opt = sum(x.size for x in trainable if x.ndim > 0)
    n_lora = sum(np.size(x) for p, x in jax.tree_util.tree_flatten_with_path(after)[0]
                 if path_str(p).startswith("projector/") or "lora_" in path_str(p))
    assert n_opt == 2 * n_lora  # Adam moments for the trained parameters only


def test_adapters_graft_onto_imported_llm(tmp_path):
    from mmjax.hf import load

    llm_dir = hf.save(hf.make_model(transformers.LlamaForCausalLM, hf.llm_config("llama")),
                      tmp_path / "llm")
    imported = load(llm_dir)
    cfg = dataclasses.replace(CFG, llm=imported.config)

    init = InitConfig(hf_llm=str(llm_dir), stage1_parts=())
    model = Llava(cfg, RT)
    mesh = single_device_mesh()
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *ARGS))["params"]
    abstract, shardings = nn.unbox(boxed), logical_shardings(boxed, mesh, RULES)
    with mesh_rules(mesh, RULES):
        params = initial_params(model, init, abstract, shardings, RT, mesh, RULES)
    q = params["language_model"]["layers"]["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(
        q["kernel"], imported.params["layers"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    assert q["lora_a"].shape == (cfg.llm.hidden_size, 4) and not np.any(q["lora_b"])
