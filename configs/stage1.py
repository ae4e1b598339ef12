"""Stage 1 (alignment): vision and LLM frozen, projector trained on image-caption pairs.

Variants: llava15_7b (default), llava15_13b, siglip_qwen2_7b, llava_1b, demo.
Set the weights and data fields (init.hf_vision + init.hf_llm or init.hf_llava, data.sources),
e.g. --config.init.hf_vision=/data/hf/clip-vit-large-patch14-336.
"""
from configs import common

VARIANTS = ("llava15_7b", "llava15_13b", "siglip_qwen2_7b", "llava_1b", "demo")


def get_config(arg=None):
    variant = arg or "llava15_7b"
    if variant not in VARIANTS:
        raise common.variant_error(variant, VARIANTS)
    if variant == "demo":
        return common.demo_training(1)
    c = common.training(1)
    c.model = variant
    return c
