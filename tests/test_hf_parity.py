"""Numerical parity with transformers (float32) for every supported family.

Each test builds a tiny random transformers model, saves it as a local safetensors
checkpoint, imports it with `mmjax.hf.load` and compares outputs on the same inputs.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from jitted import forward

from hf_fixtures import (
    llava_config,
    llm_config,
    make_model,
    normalize,
    real_images,
    rel_err,
    rewrite_llava_layout,
    save,
    vision_config,
)
from mmjax.hf import load
from mmjax.models.config import RuntimeConfig

TOL = 1e-5
LLMS = {"llama": tf.LlamaForCausalLM, "llama3": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}


def _positions(ids):
    return np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()


@pytest.mark.parametrize("family", sorted(LLMS))
def test_llm_parity_with_padding(family, tmp_path):
    model = make_model(LLMS[family], llm_config(family))
    imported = load(save(model, tmp_path))
    # 40 tokens: longer than Mistral's window (5), positions past llama3's original context.
    ids = np.random.default_rng(0).integers(0, 128, (2, 40))
    seg = np.ones_like(ids, dtype=np.int32)
    seg[1, 29:] = 0  # right padding
    pos = _positions(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(seg),
                    position_ids=torch.tensor(pos)).logits.numpy()
    ours = forward(imported.model, {"params": imported.params}, jnp.asarray(ids), jnp.asarray(pos),
                                jnp.asarray(seg)).logits
    assert ours.shape == ref.shape
    assert rel_err(ours, ref, seg.astype(bool)) < TOL


def test_llm_config_features_are_imported(tmp_path):
    cfg = load(save(make_model(tf.LlamaForCausalLM, llm_config("llama3")), tmp_path)).config
    assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    qwen = load(save(make_model(tf.Qwen2ForCausalLM, llm_config("qwen2")), tmp_path / "q")).config
    assert qwen.qkv_bias and qwen.tie_word_embeddings
    mistral = load(save(make_model(tf.MistralForCausalLM, llm_config("mistral")),
                        tmp_path / "m")).config
    assert mistral.sliding_window == 5


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_tower_parity_all_layers(family, tmp_path):
    cls = tf.CLIPVisionModel if family == "clip" else tf.SiglipVisionModel
    model = make_model(cls, vision_config(family))
    imported = load(save(model, tmp_path))
    cfg = imported.config
    pixels = normalize(real_images(cfg.image_size), cfg.image_mean, cfg.image_std)
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                    output_hidden_states=True)
    hidden, normed = forward(imported.model, {"params": imported.params}, jnp.asarray(pixels),
                                          post_norm=True)
    assert len(hidden) == len(ref.hidden_states) == cfg.num_layers + 1
    for ours, theirs in zip(hidden, ref.hidden_states):
        assert rel_err(ours, theirs.numpy()) < TOL
    if family == "clip":  # CLIP post-norms only the pooled class token
        assert rel_err(normed[:, 0], ref.pooler_output.numpy()) < TOL
    else:
        assert rel_err(normed, ref.last_hidden_state.numpy()) < TOL


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_dual_encoder_checkpoint_imports_vision_side(family, tmp_path):
    cls, cfg_cls = ((tf.CLIPModel, tf.CLIPConfig) if family == "clip"
                    else (tf.SiglipModel, tf.SiglipConfig))
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    model = make_model(cls, cfg_cls(vision_config=vision_config(family).to_dict(),
                                    text_config=text))
    imported = load(save(model, tmp_path))
    assert imported.unused and all(("text_model." in k or k.startswith("logit_")
                                    or "projection" in k or ".head." in k or k.startswith("head."))
                                   for k in imported.unused)
    pixels = normalize(real_images(56, 2), imported.config.image_mean, imported.config.image_std)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                                 output_hidden_states=True).hidden_states
    ours = forward(imported.model, {"params": imported.params}, jnp.asarray(pixels))
    assert rel_err(ours[-2], ref[-2].numpy()) < TOL


def _llava_batch(cfg, pixels):
    """3 rows: one image + padding, two images, text only + padding."""
    p = cfg.image_tokens
    t = 2 * p + 12
    ids = np.random.default_rng(1).integers(0, 120, (3, t))
    ids[0, 2:2 + p] = cfg.image_token_id
    ids[1, 1:1 + p] = cfg.image_token_id
    ids[1, 5 + p:5 + 2 * p] = cfg.image_token_id
    seg = np.ones((3, t), np.int32)
    seg[0, p + 8:] = 0
    seg[2, t - 7:] = 0
    slots = np.zeros((3, 2) + pixels.shape[1:], np.float32)
    slots[0, 0], slots[1, 0], slots[1, 1] = pixels[0], pixels[1], pixels[2]
    return ids, slots, seg, pixels[:3]


@pytest.mark.parametrize("layout", ["hub", "current"])
@pytest.mark.parametrize("towers", [("clip", "llama"), ("siglip", "qwen2"), ("clip", "mistral")])
def test_llava_parity(towers, layout, tmp_path):
    vision, text = towers
    hf_cfg = llava_config(vision, text)
    if vision == "siglip":
        hf_cfg.vision_feature_layer, hf_cfg.vision_feature_select_strategy = -1, "full"
    model = make_model(tf.LlavaForConditionalGeneration, hf_cfg)
    save(model, tmp_path)
    rewrite_llava_layout(tmp_path, layout)
    imported = load(tmp_path)
    cfg = imported.config
    images = normalize(real_images(cfg.vision.image_size), cfg.vision.image_mean,
                       cfg.vision.image_std)
    ids, slots, seg, flat = _llava_batch(cfg, images)
    pos = _positions(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(seg),
                    position_ids=torch.tensor(pos),
                    pixel_values=torch.tensor(flat).permute(0, 3, 1, 2)).logits.numpy()
    ours = forward(imported.model, {"params": imported.params}, jnp.asarray(ids),
                                jnp.asarray(slots), jnp.asarray(pos), jnp.asarray(seg)).logits
    assert rel_err(ours, ref, seg.astype(bool)) < TOL


@pytest.mark.parametrize("select", ["default", "full"])
def test_siglip_llava_imports_at_parity_under_either_strategy(select, tmp_path):
    """transformers' 'default' drops the tower's first token whatever it is: with SigLIP (no
    CLS) one patch. Imported either way, the image token count is transformers' and
    `mmjax.hf verify` passes."""
    from mmjax.hf.verify import verify

    hf_cfg = llava_config("siglip", "qwen2")
    hf_cfg.vision_feature_select_strategy = select
    save(make_model(tf.LlavaForConditionalGeneration, hf_cfg), tmp_path)
    cfg = load(tmp_path).config
    n = cfg.vision.num_patches
    assert cfg.vision_feature_select == select
    assert cfg.image_tokens == (n - 1 if select == "default" else n)
    err, _ = verify(str(tmp_path), "float32", None, 2, 16, 0)
    assert err < 1e-5


def test_llava_scanned_import_matches_unscanned(tmp_path):
    model = make_model(tf.LlavaForConditionalGeneration, llava_config("clip", "llama"))
    save(model, tmp_path)
    plain = load(tmp_path)
    scanned = load(tmp_path, RuntimeConfig(scan_layers=True, remat_policy="full"))
    assert "layer" in scanned.params["language_model"]["layers"]
    cfg = plain.config
    images = normalize(real_images(cfg.vision.image_size), cfg.vision.image_mean,
                       cfg.vision.image_std)
    ids, slots, seg, _ = _llava_batch(cfg, images)
    args = (jnp.asarray(ids), jnp.asarray(slots), jnp.asarray(_positions(ids)), jnp.asarray(seg))
    a = forward(plain.model, {"params": plain.params}, *args).logits
    b = forward(scanned.model, {"params": scanned.params}, *args).logits
    assert rel_err(b, a, seg.astype(bool)) < TOL


def test_llava_hidden_states_returned(tmp_path):
    model = make_model(tf.LlavaForConditionalGeneration, llava_config())
    imported = load(save(model, tmp_path))
    ids = np.zeros((1, 8), np.int32)
    out = forward(imported.model, {"params": imported.params}, jnp.asarray(ids))
    assert out.logits.shape == (1, 8, 128) and out.hidden.shape == (1, 8, 64)
    assert out.cache is None
    no_head = forward(imported.model, {"params": imported.params}, jnp.asarray(ids), head=False)
    assert no_head.logits is None
    np.testing.assert_array_equal(no_head.hidden, out.hidden)
