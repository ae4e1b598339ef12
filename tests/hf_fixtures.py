"""Tiny random transformers models saved as local checkpoints, and reference forwards.

Everything here is built locally (random init, `save_pretrained`); nothing comes from a hub.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers as tf

TINY_LLM = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TINY_CLIP = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 image_size=56, patch_size=14)
TINY_SIGLIP = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, image_size=56, patch_size=14)


def llm_config(family: str, **over):
    base = dict(TINY_LLM, **over)
    if family == "llama3":
        base.setdefault("rope_parameters", {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        return tf.LlamaConfig(**base)
    if family == "llama":
        return tf.LlamaConfig(**base)
    if family == "mistral":
        base.setdefault("sliding_window", 5)
        return tf.MistralConfig(**base)
    if family == "qwen2":
        base.setdefault("tie_word_embeddings", True)
        return tf.Qwen2Config(**base)
    raise ValueError(family)


def make_model(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).eval().float()
    # transformers zero-initialises biases and norms: randomise every tensor so that a
    # wrong mapping cannot hide behind a zero or a one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def safetensors_of(directory) -> dict:
    """Every tensor of a checkpoint directory's safetensors files, by key."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_loss_sum(model, input_ids, labels, **inputs) -> tuple[float, int]:
    """A transformers LLaVA's summed next-token loss over one sample's labels and the label
    count (its mean loss times the count), for comparing with mmjax's summed loss."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids[None]).long(),
                    labels=torch.tensor(labels[None]).long(), **inputs)
    n = int(np.sum(labels[1:] != -100))
    return float(out.loss) * n, n


def rel_err(ours, ref, mask=None) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask], ref[mask]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def real_images(size: int, n: int = 3) -> np.ndarray:
    """n real photos (scikit-image's), resized to size x size, float in [0, 1]: [n, S, S, 3]."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()][:n]
    out = [np.asarray(Image.fromarray(p).convert("RGB").resize((size, size), Image.BICUBIC))
           for p in photos]
    return np.stack(out).astype(np.float32) / 255.0


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((images - mean) / std).astype(np.float32)


def vision_config(family: str, **over):
    if family == "clip":
        return tf.CLIPVisionConfig(**dict(TINY_CLIP, **over))
    return tf.SiglipVisionConfig(**dict(TINY_SIGLIP, **over))


def llava_config(vision: str = "clip", text: str = "llama", **over):
    vc = vision_config(vision)
    tc = llm_config(text)
    over.setdefault("image_token_id", 127)
    return tf.LlavaConfig(vision_config=vc, text_config=tc, **over)


LAYOUT_PREFIXES = {
    # (vision tower, projector, decoder, lm_head) prefixes
    "hub": ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
            "language_model.lm_head."),
    "current": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.",
                "lm_head."),
}


def rewrite_llava_layout(directory, layout: str) -> None:
    """Rewrites a saved LLaVA checkpoint in the given key layout ('hub' or 'current')."""
    import glob
    import os

    from safetensors.torch import load_file, save_file

    seen = ("vision_tower.", "multi_modal_projector.", "language_model.model.",
            "language_model.lm_head.")
    want = LAYOUT_PREFIXES[layout]
    for f in glob.glob(os.path.join(directory, "*.safetensors")):
        out = {}
        for k, v in load_file(f).items():
            for old, new in zip(seen, want):
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            else:
                raise AssertionError(f"unexpected saved key {k}")
            out[k] = v.contiguous()
        save_file(out, f, metadata={"format": "pt"})
