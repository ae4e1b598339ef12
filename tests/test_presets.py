"""Real-size configs: parameter shapes through jax.eval_shape (no memory), counted against
transformers' models for the same configs (built on the meta device)."""
import re

import pytest
import torch
import transformers as tf

from mmjax.hf.config import hf_config_object
from mmjax.models import presets
from mmjax.models.factory import abstract_variables, count_params
from mmjax.models.llava import normalized_feature_layers


def _hf_params(cfg):
    hc = hf_config_object(cfg)
    with torch.device("meta"):
        if isinstance(hc, tf.LlavaConfig):
            model = tf.LlavaForConditionalGeneration(hc)
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
    assert presets.get("siglip_qwen2_7b").image_tokens == 729  # 27 x 27
