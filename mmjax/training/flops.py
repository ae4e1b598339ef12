"""Model FLOPs per step and MFU, counted the way MaxText counts them.

Per text token of a row of length S, for each decoder layer and the lm_head:
    matmul FLOPs  = m x 2 x (matmul parameters)     (embedding lookup excluded)
    attention     = m x 4 x S x d_attn / 2           (QK^T and AV, causal: half)
with m = 3 (forward + backward for activations and weights) when the LLM is trained, m = 2
(forward + activation backward, no weight gradients) when it is frozen but gradients flow
through it to the projector (stage 1), 1 for a frozen LLM nothing is trained through.
LoRA counts the frozen base as m = 2 and the adapters as m = 3.
The vision tower (frozen in both LLaVA stages, nothing flows back into it) counts forward
only: 2 x params x patches + 4 x P^2 x d per layer (non-causal); a trained tower counts 3x.
The projector runs on every patch; trained (both LLaVA stages) it counts 3x.

MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device). `mfu` counts the
real (non-pad) tokens and images of the step, so padding never counts as useful work;
`mfu_all_slots` counts every slot of every row and every image slot, as MaxText does (its
tokens are rows x length), and is higher by the padding share.
"""
from __future__ import annotations

import dataclasses

import jax

from mmjax.models.config import LlavaConfig, RuntimeConfig
from mmjax.models.llava import normalized_feature_layers

# Dense bf16 peak FLOP/s per device (vendor figures), matched by substring of device_kind.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override (TFLOP/s) if set, else the table, else None."""
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


@dataclasses.dataclass(frozen=True)
class Trained:
    vision: bool = False
    projector: bool = True
    llm: bool = True
    llm_gets_gradients: bool = True  # stage 1: frozen LLM, gradients pass through it

    @classmethod
    def from_labels(cls, labels) -> "Trained":
        """What the optimizer updates, by tower, from its group labels (-1 = frozen)."""
        trains = {part: any(g >= 0 for g in jax.tree.leaves(tree))
                  for part, tree in labels.items()}
        vision, projector = trains.get("vision_tower", False), trains.get("projector", False)
        return cls(vision=vision, projector=projector, llm=trains.get("language_model", False),
                   llm_gets_gradients=vision or projector)


def llm_matmul_params(cfg: LlavaConfig) -> int:
    c = cfg.llm
    d, h = c.hidden_size, c.head_size
    attn = d * h * (c.num_heads * 2 + c.num_kv_heads * 2)
    mlp = 3 * d * c.intermediate_size
    return c.num_layers * (attn + mlp) + d * c.vocab_size  # lm_head (tied or not)


def lora_params(cfg: LlavaConfig, rt: RuntimeConfig) -> int:
    if not rt.lora_rank:
        return 0
    c, r = cfg.llm, rt.lora_rank
    d, h, f = c.hidden_size, c.head_size, c.intermediate_size
    sizes = {"q_proj": (d, c.num_heads * h), "k_proj": (d, c.num_kv_heads * h),
             "v_proj": (d, c.num_kv_heads * h), "o_proj": (c.num_heads * h, d),
             "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return c.num_layers * sum(r * (i + o) for name, (i, o) in sizes.items()
                              if name in rt.lora_targets)


def vision_flops_per_image(cfg: LlavaConfig, multiplier: int) -> float:
    v = cfg.vision
    depth = max(normalized_feature_layers(cfg))
    tokens = v.num_patches + (1 if v.has_cls else 0)
    per_layer = 2 * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    per_layer += 4 * tokens * tokens * v.hidden_size
    patch_embed = 2 * v.num_patches * v.patch_size ** 2 * 3 * v.hidden_size
    return multiplier * (depth * per_layer + patch_embed)


def projector_flops_per_image(cfg: LlavaConfig, multiplier: int) -> float:
    v, d = cfg.vision, cfg.llm.hidden_size
    width = v.hidden_size * len(cfg.feature_layers)
    depth = cfg.projector.depth
    params = width * d + (depth - 1) * d * d
    return multiplier * 2 * params * cfg.view_tokens


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """A step's model FLOPs are linear in its real tokens and its images."""

    per_token: float
    per_image: float

    @classmethod
    def of(cls, cfg: LlavaConfig, rt: RuntimeConfig, trained: Trained,
           row_length: int) -> "FlopModel":
        c = cfg.llm
        if trained.llm and not rt.lora_rank:
            m = 3
        elif trained.llm_gets_gradients or rt.lora_rank:
            m = 2
        else:
            m = 1
        per_token = m * 2 * llm_matmul_params(cfg) + 3 * 2 * lora_params(cfg, rt)
        attn_m = 3 if (trained.llm or trained.llm_gets_gradients or rt.lora_rank) else 1
        per_token += attn_m * c.num_layers * 4 * row_length * c.num_heads * c.head_size / 2
        per_image = (vision_flops_per_image(cfg, 3 if trained.vision else 1)
                     + projector_flops_per_image(cfg, 3 if trained.projector else 1))
        return cls(per_token, per_image)

    def step(self, real_tokens: int, images: int) -> float:
        """Model FLOPs of steps over `real_tokens` text+image tokens and `images` images."""
        return self.per_token * real_tokens + self.per_image * images


def mfu(flops: float, seconds: float, devices: int, peak: float | None) -> float | None:
    if not peak or seconds <= 0:
        return None
    return flops / (seconds * devices * peak)
