"""Stage 2 (visual instruction tuning): vision frozen, projector and LLM trained.

Variants: llava15_7b (default), llava15_13b, siglip_qwen2_7b (chatml), llava_1b, demo;
append `_lora` (e.g. llava15_7b_lora) for LLaVA-1.5's LoRA recipe (same as
--config.lora.enabled=True).
The projector comes from stage 1 (init.stage1_checkpoint: its work dir), the towers from
HF weights (init.hf_vision + init.hf_llm, or init.hf_llava).
"""
from configs import common

VARIANTS = ("llava15_7b", "llava15_13b", "siglip_qwen2_7b", "llava_1b", "demo")


def get_config(arg=None):
    variant = arg or "llava15_7b"
    use_lora = variant.endswith("_lora")
    variant = variant.removesuffix("_lora")
    if variant not in VARIANTS:
        raise common.variant_error(variant, VARIANTS + tuple(v + "_lora" for v in VARIANTS))
    if variant == "demo":
        c = common.demo_training(2)
    else:
        c = common.training(2)
        c.model = variant
        if variant == "siglip_qwen2_7b":
            c.data.template = "chatml"
    c.lora.enabled = use_lora
    return c
