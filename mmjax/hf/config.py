"""Hugging Face `config.json` <-> mmjax model configs.

`from_hf` reads the architecture named in config.json and builds the matching mmjax config,
refusing (with `ConfigError`) anything the model cannot represent. `to_hf` goes the other
way, for tests and for counting parameters of the named presets against transformers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmjax.errors import ConfigError
from mmjax.models.config import LlavaConfig, LLMConfig, ProjectorConfig, RopeConfig, VisionConfig

VISION_ARCHS = {"CLIPVisionModel": "clip", "CLIPModel": "clip",
                "SiglipVisionModel": "siglip", "SiglipModel": "siglip"}
LLM_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
             "Qwen2ForCausalLM": "qwen2"}
LLAVA_ARCHS = {"LlavaForConditionalGeneration": "llava",
               "LlavaNextForConditionalGeneration": "llava_next",
               "LlavaOnevisionForConditionalGeneration": "llava_onevision"}
SUPPORTED = {**VISION_ARCHS, **LLM_ARCHS, **LLAVA_ARCHS}

_DEFAULT_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def architecture(config: dict, where: str = "config.json") -> str:
    archs = config.get("architectures") or []
    known = [a for a in archs if a in SUPPORTED]
    if not known:
        raise ConfigError(
            f"{where}: unknown architecture {archs or config.get('model_type')!r}; supported: "
            f"{', '.join(sorted(SUPPORTED))}")
    return known[0]


def from_hf(config: dict, directory: str | Path | None = None):
    """The mmjax config (VisionConfig, LLMConfig or LlavaConfig) for an HF config dict."""
    arch = architecture(config)
    if arch in VISION_ARCHS:
        dual = arch in ("CLIPModel", "SiglipModel")
        sub = config.get("vision_config", config) if dual else config
        return vision_from_hf(sub, VISION_ARCHS[arch], directory)
    if arch in LLM_ARCHS:
        return llm_from_hf(config, LLM_ARCHS[arch])
    return llava_from_hf(config, directory)


def image_processor_config(directory) -> dict:
    """A HF directory's image processor settings: preprocessor_config.json, or the
    `image_processor` entry of processor_config.json (transformers 5 saves processors so);
    {} when it has neither."""
    directory = Path(directory)
    path = directory / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    path = directory / "processor_config.json"
    if path.is_file():
        return json.loads(path.read_text()).get("image_processor") or {}
    return {}


def image_aspect(directory) -> str:
    """How a HF directory's image processor brings an image to the tower's square (the
    inverse of `mmjax.hf.writer.image_processor`): pinpoints -> anyres (LLaVA-NeXT's views),
    do_pad -> pad, a centre crop -> crop, else resize; `pad` (LLaVA-1.5's) when the
    directory has no image processor settings."""
    pre = image_processor_config(directory)
    if not pre:
        return "pad"
    if pre.get("image_grid_pinpoints"):
        return "anyres"
    if pre.get("do_pad"):
        return "pad"
    return "crop" if pre.get("do_center_crop") else "resize"


def vision_from_hf(c: dict, family: str, directory=None) -> VisionConfig:
    mean, std = _DEFAULT_MEAN_STD[family]
    pre = image_processor_config(directory) if directory is not None else {}
    if pre:
        mean = tuple(pre.get("image_mean", mean))
        std = tuple(pre.get("image_std", std))
    if c.get("num_channels", 3) != 3:
        raise ConfigError(f"vision num_channels {c['num_channels']} (only RGB, 3)")
    defaults = {"clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=224, patch_size=32,
                             layer_norm_eps=1e-5, hidden_act="quick_gelu"),
                "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=16,
                               layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")}[family]
    g = {**defaults, **{k: v for k, v in c.items() if v is not None}}
    cfg = VisionConfig(
        family=family, image_size=g["image_size"], patch_size=g["patch_size"],
        hidden_size=g["hidden_size"], intermediate_size=g["intermediate_size"],
        num_layers=g["num_hidden_layers"], num_heads=g["num_attention_heads"],
        layer_norm_eps=g["layer_norm_eps"], hidden_act=g["hidden_act"],
        image_mean=tuple(mean), image_std=tuple(std))
    cfg.validate()
    return cfg


def _rope(c: dict) -> RopeConfig:
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(theta=float(theta), rope_type="llama3", factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=int(
                              params["original_max_position_embeddings"]))
    raise ConfigError(f"rope type {kind!r} is not supported (default, linear, llama3)")


def llm_from_hf(c: dict, family: str) -> LLMConfig:
    heads = c["num_attention_heads"]
    sliding = None
    if family == "mistral":
        sliding = c.get("sliding_window")
    elif family == "qwen2" and c.get("use_sliding_window"):
        if c.get("max_window_layers", 0) < c["num_hidden_layers"]:
            raise ConfigError("Qwen2 with sliding window on only some layers "
                              "(use_sliding_window with max_window_layers) is not supported")
        sliding = c.get("sliding_window")
    cfg = LLMConfig(
        family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim"), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope=_rope(c), max_position_embeddings=c.get("max_position_embeddings", 4096),
        qkv_bias=True if family == "qwen2" else bool(c.get("attention_bias", False)),
        attention_out_bias=False if family == "qwen2" else bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        sliding_window=sliding, hidden_act=c.get("hidden_act", "silu"))
    cfg.validate()
    return cfg


def llava_from_hf(c: dict, directory=None) -> LlavaConfig:
    vc, tc = dict(c.get("vision_config") or {}), dict(c.get("text_config") or {})
    vtype = vc.get("model_type", "clip_vision_model")
    family = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(vtype)
    if family is None:
        raise ConfigError(f"LLaVA vision tower {vtype!r} is not supported (CLIP, SigLIP)")
    ttype = tc.get("model_type", "llama")
    if ttype not in LLM_ARCHS.values():
        raise ConfigError(
            f"LLaVA language model {ttype!r} is not supported (llama, mistral, qwen2)")
    if "tie_word_embeddings" not in tc and "tie_word_embeddings" in c:
        tc["tie_word_embeddings"] = c["tie_word_embeddings"]
    if c.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {c['projector_hidden_act']!r} (only 'gelu')")
    archs = c.get("architectures") or []
    onevision = "LlavaOnevisionForConditionalGeneration" in archs
    anyres = onevision or "LlavaNextForConditionalGeneration" in archs
    # transformers leaves a class's defaults out of config.json; OneVision's differ
    default = (dict(layer=-1, select="full", image=151646, video=151647) if onevision else
               dict(layer=-2, select="default", image=32000, video=-1))
    layer = c.get("vision_feature_layer", default["layer"])
    aspect = c.get("vision_aspect_ratio", "anyres_max_9") if onevision else ""
    if onevision and not re.fullmatch(r"anyres_max_\d+", aspect):
        raise ConfigError(f"vision_aspect_ratio {aspect!r}: only anyres_max_N is read")
    cfg = LlavaConfig(
        vision=vision_from_hf(vc, family, directory), llm=llm_from_hf(_text_defaults(tc), ttype),
        projector=ProjectorConfig("mlp2x_gelu", bias=c.get("multimodal_projector_bias", True)),
        image_token_id=c.get("image_token_id", c.get("image_token_index", default["image"])),
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select=c.get("vision_feature_select_strategy", default["select"]),
        image_grid_pinpoints=tuple((int(h), int(w)) for h, w in
                                   c.get("image_grid_pinpoints") or ()) if anyres else (),
        anyres_max=int(aspect.removeprefix("anyres_max_")) if onevision else 0,
        video_token_id=c.get("video_token_id", c.get("video_token_index", default["video"])))
    cfg.validate()
    return cfg


def _text_defaults(tc: dict) -> dict:
    # LLaVA configs may omit text fields that equal LlamaConfig's defaults.
    base = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048}
    return {**base, **{k: v for k, v in tc.items() if v is not None}}


# ----------------------------------------------------------------------------- mmjax -> HF


def vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    return dict(model_type="clip_vision_model" if v.family == "clip" else "siglip_vision_model",
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                image_size=v.image_size, patch_size=v.patch_size,
                layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, num_channels=3)


def llm_to_hf(m: LLMConfig) -> dict[str, Any]:
    family = m.family
    rope: dict[str, Any] = {"rope_type": m.rope.rope_type, "rope_theta": m.rope.theta}
    if m.rope.rope_type == "linear":
        rope["factor"] = m.rope.factor
    elif m.rope.rope_type == "llama3":
        rope.update(factor=m.rope.factor, low_freq_factor=m.rope.low_freq_factor,
                    high_freq_factor=m.rope.high_freq_factor,
                    original_max_position_embeddings=m.rope.original_max_position_embeddings)
    out = dict(model_type=family, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
               intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
               rms_norm_eps=m.rms_norm_eps, max_position_embeddings=m.max_position_embeddings,
               tie_word_embeddings=m.tie_word_embeddings, rope_parameters=rope,
               hidden_act=m.hidden_act)
    if m.head_dim is not None:
        out["head_dim"] = m.head_dim
    if family == "llama":
        out.update(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias)
    elif family == "mistral":
        out.update(sliding_window=m.sliding_window)
    elif family == "qwen2":
        out.update(use_sliding_window=m.sliding_window is not None,
                   sliding_window=m.sliding_window)
    return out


def hf_config_object(cfg):
    """A transformers config object for an mmjax config."""
    import transformers as tf  # start-up cost: only tests and export need the objects

    if isinstance(cfg, VisionConfig):
        cls = tf.CLIPVisionConfig if cfg.family == "clip" else tf.SiglipVisionConfig
        d = vision_to_hf(cfg)
        d.pop("model_type")
        return cls(**d)
    if isinstance(cfg, LLMConfig):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig,
               "qwen2": tf.Qwen2Config}[cfg.family]
        d = llm_to_hf(cfg)
        d.pop("model_type")
        return cls(**d)
    if cfg.projector.kind != "mlp2x_gelu":
        raise ConfigError("transformers' LLaVA has only the mlp2x_gelu projector")
    layer = cfg.vision_feature_layer
    common = dict(
        vision_config=hf_config_object(cfg.vision), text_config=hf_config_object(cfg.llm),
        projector_hidden_act="gelu",
        vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
        vision_feature_select_strategy=cfg.vision_feature_select,
        multimodal_projector_bias=cfg.projector.bias,
        tie_word_embeddings=cfg.llm.tie_word_embeddings)
    if cfg.anyres_max:  # LLaVA-OneVision
        return tf.LlavaOnevisionConfig(
            image_token_index=cfg.image_token_id, video_token_index=cfg.video_token_id,
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            vision_aspect_ratio=f"anyres_max_{cfg.anyres_max}", **common)
    if cfg.anyres:  # LLaVA-NeXT
        return tf.LlavaNextConfig(
            image_token_index=cfg.image_token_id, image_seq_length=cfg.view_tokens,
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints], **common)
    return tf.LlavaConfig(image_token_id=cfg.image_token_id, **common)
