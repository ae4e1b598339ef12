"""Model-level behaviour: kernels wired through the LLM, remat/scan options, the merge."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jitted import forward, init

from mmjax.models import LLM, Llava, RuntimeConfig, merge_embeddings, presets


def _llm_inputs(t=128):
    ids = np.random.default_rng(0).integers(0, 512, (2, t))
    seg = np.zeros((2, t), np.int32)
    seg[0, :60], seg[0, 60:100] = 1, 2  # packed row
    seg[1, :] = 1
    pos = np.concatenate([np.arange(60), np.arange(40), np.zeros(t - 100, int)])
    pos = np.stack([pos, np.arange(t)])
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


@pytest.fixture(scope="module")
def tiny_llm():
    cfg = presets.get("tiny_llm")
    ids, pos, seg = _llm_inputs()
    params = nn.unbox(init(LLM(cfg), jax.random.key(0), ids, pos, seg))
    return cfg, params


@pytest.mark.parametrize("impl", ["xla", "splash_interpret"])
def test_llm_with_each_cpu_kernel_matches_reference(tiny_llm, impl):
    cfg, params = tiny_llm
    ids, pos, seg = _llm_inputs()
    ref = forward(LLM(cfg), params, ids, pos, seg).logits
    out = forward(LLM(cfg, RuntimeConfig(attention_impl=impl)), params, ids, pos, seg).logits
    m = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(ref)[m], atol=2e-5)


def test_packed_row_equals_samples_alone(tiny_llm):
    cfg, params = tiny_llm
    ids, pos, seg = _llm_inputs()
    packed = forward(LLM(cfg), params, ids, pos, seg).logits
    first = forward(LLM(cfg), params, ids[:1, :60]).logits
    second = forward(LLM(cfg), params, ids[:1, 60:100]).logits
    np.testing.assert_allclose(packed[0, :60], first[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 60:100], second[0], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_qkv_context"])
def test_remat_policies_keep_values_and_gradients(tiny_llm, policy):
    cfg, params = tiny_llm
    ids, pos, seg = _llm_inputs()

    def loss(model):
        return lambda p: jnp.mean(model.apply(p, ids, pos, seg).logits ** 2)

    ref_val, ref_grad = jax.value_and_grad(loss(LLM(cfg)))(params)
    val, grad = jax.jit(jax.value_and_grad(loss(LLM(cfg, RuntimeConfig(remat_policy=policy)))))(
        params)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_params_stack_layers():
    cfg = presets.get("tiny")
    rt = RuntimeConfig(scan_layers=True)
    shapes = jax.eval_shape(lambda: Llava(cfg, rt).init(
        jax.random.key(0), jnp.zeros((1, 4), int), jnp.zeros((1, 1, 56, 56, 3))))
    boxed = shapes["params"]["language_model"]["layers"]["layer"]["self_attn"]["q_proj"]["kernel"]
    assert boxed.value.shape == (cfg.llm.num_layers, 64, 4, 16)
    assert boxed.names == ("layers", "embed", "heads", "head_dim")


def test_merge_embeddings_takes_images_in_order_per_row():
    text = jnp.zeros((2, 6, 1))
    images = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1)  # 2 rows x 4 image tokens
    mask = jnp.asarray([[0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
    out = merge_embeddings(text, images, mask)[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 3, 4], [5, 0, 0, 0, 0, 0]])


def test_llava_without_images_is_the_llm():
    cfg = presets.get("tiny")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 10)))
    llava = Llava(cfg)
    params = init(llava, jax.random.key(1), ids, jnp.zeros((2, 1, 56, 56, 3)))["params"]
    a = forward(llava, {"params": params}, ids).logits
    b = forward(LLM(cfg.llm), {"params": params["language_model"]}, ids).logits
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = presets.get("tiny")
    rt = RuntimeConfig(dtype="bfloat16")
    ids = jnp.zeros((1, 20), int).at[0, 1:17].set(cfg.image_token_id)
    llava = Llava(cfg, rt)
    variables = init(llava, jax.random.key(0), ids, jnp.zeros((1, 1, 56, 56, 3)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(variables)))
    logits = forward(llava, nn.unbox(variables), ids, jnp.zeros((1, 1, 56, 56, 3))).logits
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert dataclasses.asdict(rt)["dtype"] == "bfloat16"


@pytest.mark.parametrize("scan", [False, True])
def test_vision_tower_keeps_only_the_layers_asked_for(scan):
    """`keep` returns exactly those hidden states of the full stack (scanned or not); the
    last layer alone (LLaVA's case) stacks nothing else."""
    from mmjax.models import VisionTower

    cfg = presets.get("tiny_clip")
    rt = RuntimeConfig(scan_layers=scan)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 56, 56, 3)), jnp.float32)
    params = nn.unbox(init(VisionTower(cfg, rt), jax.random.key(0), pixels))
    full = forward(VisionTower(cfg, rt), params, pixels)  # [depth+1, B, L, D]
    n = cfg.num_layers
    for keep in [(n,), (1, n), (0, 2), (n, 1)]:
        out = forward(VisionTower(cfg, rt, keep=keep), params, pixels)
        np.testing.assert_allclose(out, full[np.array(keep)], atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda p: VisionTower(cfg, rt, keep=(n,)).apply(p, pixels))(
        params))
    # no [n, B, L, D] stack of every layer's output in the last-layer-only program
    assert f"f32[{n},2,17,64]" not in jaxpr


def test_sincos_position_table_equals_big_visions():
    """The table equals big_vision's posemb_sincos_2d, run as it is (tests/data, with its
    provenance), with a zero row for a class token."""
    import json
    from pathlib import Path

    from mmjax.models.vision import sincos_2d_init

    ref = json.loads((Path(__file__).parent / "data" / "posemb_sincos_2d.json").read_text())
    table = np.asarray(ref["table"])
    n = ref["h"] * ref["w"]
    np.testing.assert_allclose(sincos_2d_init(False)(None, (n, ref["width"])), table, atol=1e-6)
    with_cls = np.asarray(sincos_2d_init(True)(None, (n + 1, ref["width"])))
    np.testing.assert_array_equal(with_cls[0], 0.0)
    np.testing.assert_allclose(with_cls[1:], table, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_a_tower_from_scratch_starts_knowing_where_each_patch_lies(name):
    """A random tower's position embedding is the 2-D sine-cosine table, whatever the key;
    so on a plain image, where every patch's content is the same, its output features
    still differ by place."""
    from mmjax.models import VisionTower
    from mmjax.models.vision import sincos_2d_init

    cfg = presets.VISION[name]
    t = VisionTower(cfg, RuntimeConfig())
    pixels = jnp.full((1, cfg.image_size, cfg.image_size, 3), 0.3)
    p0, p1 = (nn.unbox(init(t, jax.random.key(k), pixels)) for k in (0, 1))
    pos = np.asarray(p0["params"]["position_embedding"])
    np.testing.assert_array_equal(pos, p1["params"]["position_embedding"])
    np.testing.assert_array_equal(pos, sincos_2d_init(cfg.has_cls)(None, pos.shape))
    h = np.asarray(forward(t, p0, pixels))[-1, 0, int(cfg.has_cls):]  # [L, D]
    spread = np.linalg.norm(h - h.mean(0), axis=-1).mean() / np.linalg.norm(h, axis=-1).mean()
    assert spread > 0.2  # with normal(0.02) embeddings: 0.12
