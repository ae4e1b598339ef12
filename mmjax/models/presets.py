"""Named model sizes: the real towers and LLMs LLaVA recipes use, and tiny test sizes.

`get(name)` returns the config; `NAMES` lists them. Real sizes are only ever built through
`jax.eval_shape` in tests (no memory); weights for them come from local HF checkpoints.
"""
from __future__ import annotations

import dataclasses

from mmjax.errors import ConfigError
from mmjax.models.config import LlavaConfig, LLMConfig, ProjectorConfig, RopeConfig, VisionConfig

SIGLIP_MEAN_STD = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

VISION = {
    "clip_vit_l14_224": VisionConfig(image_size=224),
    "clip_vit_l14_336": VisionConfig(image_size=336),
    "clip_vit_b16_224": VisionConfig(image_size=224, patch_size=16, hidden_size=768,
                                     intermediate_size=3072, num_layers=12, num_heads=12),
    "clip_vit_b32_224": VisionConfig(image_size=224, patch_size=32, hidden_size=768,
                                     intermediate_size=3072, num_layers=12, num_heads=12),
    "siglip_so400m_14_384": VisionConfig(
        family="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
        num_layers=27, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        **SIGLIP_MEAN_STD),
    "siglip_base_16_224": VisionConfig(
        family="siglip", image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
        num_layers=12, num_heads=12, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        **SIGLIP_MEAN_STD),
    "tiny_clip": VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_layers=3, num_heads=4),
    "tiny_siglip": VisionConfig(family="siglip", image_size=56, patch_size=14, hidden_size=64,
                                intermediate_size=128, num_layers=3, num_heads=4,
                                layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                **SIGLIP_MEAN_STD),
}

LLM = {
    # Llama-2 7B / Vicuna-7B v1.5 (LLaVA-1.5's LLM; LLaVA-hf adds 64 vocab rows, see below).
    "vicuna_7b": LLMConfig(rms_norm_eps=1e-5, max_position_embeddings=4096),
    "vicuna_13b": LLMConfig(hidden_size=5120, intermediate_size=13824, num_layers=40,
                            num_heads=40, num_kv_heads=40, rms_norm_eps=1e-5),
    "llama3_8b": LLMConfig(vocab_size=128256, intermediate_size=14336, num_kv_heads=8,
                           rope=RopeConfig(theta=500000.0), max_position_embeddings=8192),
    "llama31_8b": LLMConfig(vocab_size=128256, intermediate_size=14336, num_kv_heads=8,
                            rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192),
                            max_position_embeddings=131072),
    "mistral_7b": LLMConfig(family="mistral", intermediate_size=14336, num_kv_heads=8,
                            rope=RopeConfig(theta=1e6), max_position_embeddings=32768),
    "qwen2_7b": LLMConfig(family="qwen2", vocab_size=152064, hidden_size=3584,
                          intermediate_size=18944,
                          num_layers=28, num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6,
                          rope=RopeConfig(theta=1e6), max_position_embeddings=32768,
                          qkv_bias=True),
    "qwen25_0_5b": LLMConfig(family="qwen2", vocab_size=151936, hidden_size=896,
                             intermediate_size=4864,
                             num_layers=24, num_heads=14, num_kv_heads=2, rms_norm_eps=1e-6,
                             rope=RopeConfig(theta=1e6), max_position_embeddings=32768,
                             qkv_bias=True, tie_word_embeddings=True),
    "tinyllama_1_1b": LLMConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                num_layers=22, num_heads=32, num_kv_heads=4,
                                max_position_embeddings=2048),
    "tiny_llm": LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=1024),
}


def _llava(vision: str, llm: str, image_token_id: int, extra_vocab: int = 0, **kw) -> LlavaConfig:
    text = LLM[llm]
    if extra_vocab:  # llava-hf checkpoints pad the vocabulary (image token + alignment)
        text = dataclasses.replace(text, vocab_size=text.vocab_size + extra_vocab)
    return LlavaConfig(vision=VISION[vision], llm=text, projector=ProjectorConfig("mlp2x_gelu"),
                       image_token_id=image_token_id, **kw)


# LLaVA-NeXT's grids (llava-v1.6; `image_grid_pinpoints` of its checkpoints), in pixels
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# LLaVA-OneVision's: every grid of 1 x 1 to 6 x 6 tiles of 384 pixels ("(1x1),...,(6x6)")
ONEVISION_PINPOINTS = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))

LLAVA = {
    "llava15_7b": _llava("clip_vit_l14_336", "vicuna_7b", 32000, extra_vocab=64),
    # LLaVA-NeXT (llava-v1.6-vicuna-7b / -mistral-7b): 1.5's towers, any resolution
    "llava_next_vicuna_7b": _llava("clip_vit_l14_336", "vicuna_7b", 32000, extra_vocab=64,
                                   image_grid_pinpoints=NEXT_PINPOINTS),
    "llava_next_mistral_7b": _llava("clip_vit_l14_336", "mistral_7b", 32000, extra_vocab=64,
                                    image_grid_pinpoints=NEXT_PINPOINTS),
    # LLaVA-OneVision-7B (llava-onevision-qwen2-7b): SigLIP so400m/384 read at its
    # penultimate layer, all 729 patches, + Qwen2-7B; anyres_max_9, videos at 151647
    "onevision_qwen2_7b": _llava("siglip_so400m_14_384", "qwen2_7b", 151646,
                                 vision_feature_layer=-2, vision_feature_select="full",
                                 image_grid_pinpoints=ONEVISION_PINPOINTS, anyres_max=9,
                                 video_token_id=151647),
    "llava15_13b": _llava("clip_vit_l14_336", "vicuna_13b", 32000, extra_vocab=64),
    # SigLIP so400m + Qwen2-7B; the image token is appended after Qwen2's vocabulary.
    "siglip_qwen2_7b": _llava("siglip_so400m_14_384", "qwen2_7b", 151646,
                              vision_feature_layer=-1, vision_feature_select="full"),
    # 1B-class: CLIP-L/336 + TinyLlama-1.1B shapes (the GPU benchmark model).
    "llava_1b": _llava("clip_vit_l14_336", "tinyllama_1_1b", 32000, extra_vocab=64),
    "tiny": _llava("tiny_clip", "tiny_llm", 511),
    "tiny_siglip": _llava("tiny_siglip", "tiny_llm", 511, vision_feature_layer=-1,
                          vision_feature_select="full"),
    # The embedded demo: trained from scratch on CPU in minutes. Its tokenizer (trained by
    # the demo) puts <image> at id 4 and has at most 512 entries.
    "demo": LlavaConfig(
        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=96, intermediate_size=192,
                            num_layers=4, num_heads=4),
        llm=LLMConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=3,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=512),
        projector=ProjectorConfig("mlp2x_gelu"), image_token_id=4),
}

PRESETS = {**VISION, **LLM, **LLAVA}
NAMES = sorted(PRESETS)


def get(name: str):
    """The preset `name`; ConfigError naming the known ones when there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(NAMES)}") from None
