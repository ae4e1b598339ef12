"""Stage 2 (visual instruction tuning): vision frozen, projector and LLM trained.

Variants: auto (default: the stage-1 run's model), or a preset checked against it:
llava15_7b, llava15_13b, siglip_qwen2_7b, llava_1b; demo; append `_lora` (e.g. auto_lora)
for LLaVA-1.5's LoRA recipe (same as --config.lora.enabled=True).
llava_next_7b: LLaVA-NeXT's stage 2 (any resolution on LLaVA-NeXT's grids) after the
llava15_7b stage 1, the settings of its scripts/train/finetune_clip.sh: the tower trains at
2e-6, the projector and LLM at 1e-5, 4096 tokens (Vicuna's context).
onevision_7b: LLaVA-OneVision's stage 2 (anyres_max_9, several images, videos) as its
scripts/train/finetune_ov.sh sets it: SigLIP so400m + Qwen2-7B, the tower at 2e-6, the rest
at 1e-5, global batch 256, 32768 tokens, at most 32 frames per video.
init.stage1_checkpoint (the stage-1 work dir) gives the model, the tokenizer and every
weight (towers as stage 1 left them, its projector); or init.hf_llava alone tunes a LLaVA
checkpoint further. The template defaults to the LLM family's (vicuna_v1 for Llama-2 /
Vicuna, llama_3, chatml for Qwen2, mistral_instruct).
"""
from configs import common

VARIANTS = ("auto", "llava15_7b", "llava15_13b", "siglip_qwen2_7b", "llava_1b",
            "llava_next_7b", "onevision_7b", "demo")
PRESET = {"llava_next_7b": "llava_next_vicuna_7b", "onevision_7b": "onevision_qwen2_7b"}


def get_config(arg=None):
    variant = arg or "auto"
    use_lora = variant.endswith("_lora")
    variant = variant.removesuffix("_lora")
    if variant not in VARIANTS:
        raise common.variant_error(variant, VARIANTS + tuple(v + "_lora" for v in VARIANTS))
    if variant == "demo":
        c = common.demo_training(2)
    else:
        c = common.training(2)
        c.model = PRESET.get(variant, variant)
        c.init.stage1_parts = ["vision_tower", "projector", "language_model"]
        if variant in ("llava_next_7b", "onevision_7b"):
            # LLaVA-NeXT's and OneVision's stage 2: any resolution, the tower trained too
            c.data.image_aspect = "anyres"
            lr = 1e-5
            c.optim.groups = [["vision_tower/.*", 2e-6], ["projector/.*", lr],
                              ["language_model/.*", lr], ["image_newline", lr]]
        if variant == "llava_next_7b":
            c.data.max_length = 4096
            # fits a v5p-8 (python -m mmjax.aot: 73.0 of 95.7 GiB per chip) at 4 rows per
            # device per micro-batch; 8 rows need 96.9 GiB
            c.max_rows_per_device = 4
        if variant == "onevision_7b":
            c.data.max_length = 32768
            c.data.video_frames = 32
            c.batch_size = 256
            c.max_rows_per_device = 1
        if variant == "llava15_13b":
            # fits a v5p-8 (python -m mmjax.aot: 89.6 of 95.7 GiB per chip): every layer
            # recomputed in the backward pass, 4 rows per device per micro-batch (grad_accum
            # 8 at the global batch of 128); save_qkv and 8 rows need 108 GiB
            c.runtime.remat_policy = "full"
            c.max_rows_per_device = 4
    c.lora.enabled = use_lora
    return c
