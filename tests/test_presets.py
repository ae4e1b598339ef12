"""Real-size configs: parameter shapes through jax.eval_shape (no memory), counted against
transformers' models for the same configs (built on the meta device)."""
import re

import pytest
import torch
import transformers as tf

from mmjax.hf.config import hf_config_object
from mmjax.models import anyres, presets
from mmjax.models.factory import abstract_variables, count_params
from mmjax.models.llava import normalized_feature_layers


def _hf_params(cfg):
    hc = hf_config_object(cfg)
    with torch.device("meta"):
        if isinstance(hc, tf.LlavaConfig):
            model = tf.LlavaForConditionalGeneration(hc)
        elif isinstance(hc, tf.LlavaNextConfig):
            model = tf.LlavaNextForConditionalGeneration(hc)
        elif isinstance(hc, tf.LlavaOnevisionConfig):
            model = tf.LlavaOnevisionForConditionalGeneration(hc)
        elif isinstance(hc, tf.CLIPVisionConfig):
            model = tf.CLIPVisionModel(hc)
        elif isinstance(hc, tf.SiglipVisionConfig):
            model = tf.SiglipVisionModel(hc)
        else:
            model = tf.AutoModelForCausalLM.from_config(hc)
    return {k: p.numel() for k, p in model.named_parameters()}


def _skipped_by_import(cfg, name: str) -> bool:
    """HF parameters mmjax leaves out on purpose (pooling heads; vision layers above the
    LLaVA feature layer and the post-LayerNorm)."""
    if re.search(r"(^|\.)head\.", name):
        return True
    if hasattr(cfg, "vision") and "vision_tower" in name:
        depth = max(normalized_feature_layers(cfg))
        m = re.search(r"encoder\.layers\.(\d+)\.", name)
        return "post_layernorm" in name or (m is not None and int(m.group(1)) >= depth)
    return False


@pytest.mark.parametrize("name", sorted(set(presets.LLAVA) | set(presets.LLM)
                                        | set(presets.VISION)))
def test_preset_param_count_matches_transformers(name):
    cfg = presets.get(name)
    ours = count_params(abstract_variables(cfg)["params"])
    hf = {k: n for k, n in _hf_params(cfg).items() if not _skipped_by_import(cfg, k)}
    assert ours == sum(hf.values())


@pytest.mark.parametrize("name, billions", [("llava15_7b", 7.05), ("llava15_13b", 13.3),
                                            ("llava_1b", 1.40), ("siglip_qwen2_7b", 8.05)])
def test_real_sizes_are_real(name, billions):
    assert count_params(abstract_variables(presets.get(name))["params"]) / 1e9 == pytest.approx(
        billions, rel=0.01)


def test_image_token_counts():
    assert presets.get("llava15_7b").image_tokens == 576  # 24 x 24, CLS dropped
    # LLaVA-NeXT: "up to 2,880 tokens for one 336-pixel image on a 2x2 grid" in all: the
    # base view's 576, then the 48 x 48 grid with a newline per row
    nxt = presets.get("llava_next_vicuna_7b")
    assert nxt.max_views == 5 and nxt.view_tokens == 576
    assert anyres.feature_tokens(672, 672, nxt.image_grid_pinpoints, 336, 14) == 576 + 48 * 49
    assert presets.get("siglip_qwen2_7b").image_tokens == 729  # 27 x 27
