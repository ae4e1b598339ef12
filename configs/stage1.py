"""Stage 1 (alignment): vision and LLM frozen, projector trained on image-caption pairs.

Variants: auto (default: the model the HF towers describe), or a preset checked against them:
llava15_7b, llava15_13b, siglip_qwen2_7b, llava_1b; demo (the embedded demo).
Set the weights and data fields (init.hf_vision + init.hf_llm, data.sources), e.g.
--config.init.hf_vision=/data/hf/clip-vit-large-patch14-336
--config.init.hf_llm=/data/hf/vicuna-7b-v1.5; the run adds <image> (and a pad token) to the
LLM's tokenizer and saves the model and tokenizer in its work dir for stage 2.
"""
from configs import common

VARIANTS = ("auto", "llava15_7b", "llava15_13b", "siglip_qwen2_7b", "llava_1b", "demo")


def get_config(arg=None):
    variant = arg or "auto"
    if variant not in VARIANTS:
        raise common.variant_error(variant, VARIANTS)
    if variant == "demo":
        return common.demo_training(1)
    c = common.training(1)
    c.model = variant
    return c
