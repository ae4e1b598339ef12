"""Typed model configurations: the vision tower, the projector, the decoder LLM and LLaVA.

These are plain frozen dataclasses so that they can be hashed into `jax.jit` static
arguments and compared in tests; `mmjax.models.presets` holds the named real and tiny sizes,
and `mmjax.hf.config` builds them from a Hugging Face `config.json`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from mmjax.errors import ConfigError

VisionFamily = Literal["clip", "siglip"]
AttentionImpl = Literal["auto", "reference", "cudnn", "xla", "splash", "splash_interpret"]
RematPolicy = Literal["auto", "none", "full", "save_dots", "save_qkv", "save_qkv_context",
                      "save_qkv_context_mlp"]
Dtype = Literal["float32", "bfloat16", "float16"]
VisionActivation = Literal["quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new"]
# the LLM's linear maps that can carry LoRA adapters (all of them, LLaVA-1.5's LoRA recipe)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _from_lora(default):
    """A field the config fills from its `lora` section (configlib skips it in `runtime`)."""
    return dataclasses.field(default=default, metadata={"derived": "lora.*"})


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the networks run (not what they are): dtypes, attention kernel, remat, scan."""

    dtype: Dtype = "float32"  # activations and matmuls; bfloat16 on TPU / GPU
    param_dtype: Dtype = "float32"  # master parameters (created / imported in this dtype)
    # auto = splash on TPU, cudnn on NVIDIA GPUs in bfloat16 / float16, xla elsewhere
    attention_impl: AttentionImpl = "auto"  # the attention kernel (models/attention.py)
    # (splash_interpret: the TPU kernel in the Pallas interpreter, for CPU tests)
    remat_policy: RematPolicy = "none"  # what the backward keeps (models/remat.py); auto
    # = the platform's (mmjax.models.remat.AUTO)
    scan_layers: bool = False  # stack the layers and run them with nn.scan (faster compiles)
    # the loss applies the output projection to this many positions at a time (float32
    # logits [B, chunk, V], recomputed in the backward)
    loss_chunk: int = 512  # positions per chunk of the training loss; 0 = whole rows
    # LoRA adapters on the LLM's linear maps (stage-2 option): y = xW + (alpha/r) drop(x) A B.
    # They add `lora_a` / `lora_b` next to each targeted kernel; 0 = no adapters. Set from the
    # config's `lora` section (mmjax.training.lora.LoraConfig), not in `runtime`.
    lora_rank: int = _from_lora(0)
    lora_alpha: float = _from_lora(0.0)
    lora_dropout: float = _from_lora(0.0)  # active only when a 'dropout' rng is passed
    lora_targets: tuple[str, ...] = _from_lora(LORA_TARGETS)

    def lora(self, name: str) -> dict:
        """Keyword arguments that give the linear map `name` its adapter (or none)."""
        if not self.lora_rank or name not in self.lora_targets:
            return {}
        return dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT image encoder (CLIP or SigLIP)."""

    family: VisionFamily = "clip"
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: VisionActivation = "quick_gelu"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def has_cls(self) -> bool:
        return self.family == "clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _check(self.image_size >= self.patch_size,
               f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision hidden_size {self.hidden_size} is not divisible by "
               f"num_heads {self.num_heads}")
        _check(self.family in ("clip", "siglip"), f"unknown vision family {self.family!r}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: theta and the optional scaling (HF `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """A Llama-family decoder (Llama-2/Vicuna, Llama-3, Mistral, Qwen2)."""

    family: Literal["llama", "mistral", "qwen2"] = "llama"  # the transformers class it matches
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: Literal["silu"] = "silu"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        _check(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
               f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _check(self.hidden_act == "silu", f"LLM hidden_act {self.hidden_act!r} (only 'silu')")
        _check(self.head_size % 2 == 0, f"head_dim {self.head_size} must be even for RoPE")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """`linear` or `mlp{N}x_gelu` from vision features to LLM embeddings."""

    kind: str = "mlp2x_gelu"
    bias: bool = True

    @property
    def depth(self) -> int:
        if self.kind == "linear":
            return 1
        if self.kind.startswith("mlp") and self.kind.endswith("x_gelu"):
            return int(self.kind[3:-6])
        raise ConfigError(f"unknown projector {self.kind!r}: use 'linear' or 'mlpNx_gelu'")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The composed model: vision tower -> projector -> LLM, spliced at image tokens."""

    vision: VisionConfig = VisionConfig()
    llm: LLMConfig = LLMConfig()
    projector: ProjectorConfig = ProjectorConfig()
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    # transformers' meaning: "default" drops the tower's first token (CLIP's CLS; with a
    # tower that has none, such as SigLIP, a patch), "full" keeps every token
    vision_feature_select: Literal["default", "full"] = "default"
    # LLaVA-NeXT's any resolution: the grids an image may be cut into, (height, width) in
    # pixels, multiples of the tower's image size (mmjax.models.anyres); each image then takes
    # a base view and its grid's tiles, and its token count follows from its size. Empty:
    # one view per image (LLaVA-1.5)
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # LLaVA-OneVision's anyres_max_N: an image's tile grid is pooled down to about N tiles'
    # worth of features (0: LLaVA-NeXT's, never pooled); an image among several takes one
    # square view, and videos (frames pooled 2 x 2) stand at `video_token_id`
    anyres_max: int = 0
    video_token_id: int = -1  # the video placeholder's id (-1: the model takes no video)

    @property
    def anyres(self) -> bool:
        return bool(self.image_grid_pinpoints)

    @property
    def taps(self) -> int:
        """Features each image token takes (a weighted sum): 4 for OneVision's pooling
        (mmjax.models.anyres.TAPS), else 1."""
        return 4 if self.anyres_max else 1

    @property
    def max_views(self) -> int:
        """Views per image slot: 1, or the base view and the largest grid's tiles."""
        s = self.vision.image_size
        return 1 + max((h // s) * (w // s) for h, w in self.image_grid_pinpoints) \
            if self.anyres else 1

    @property
    def batch_views(self) -> int:
        """The views axis of a batch's image slots: 0 (none, one square per slot) or, any
        resolution, `max_views` (mmjax.batch)."""
        return self.max_views if self.anyres else 0

    @property
    def view_tokens(self) -> int:
        """LLM tokens one view's features become."""
        tokens = self.vision.num_patches + (1 if self.vision.has_cls else 0)
        return tokens - 1 if self.vision_feature_select == "default" else tokens

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)

    @property
    def image_tokens(self) -> int:
        """How many LLM tokens one image becomes (one view; an any-resolution model's count
        depends on each image's size: mmjax.models.anyres.feature_tokens)."""
        if self.anyres:
            raise ConfigError("an any-resolution (LLaVA-NeXT) model's images take a number of "
                              "tokens that depends on their size; this path takes one view "
                              "per image (LLaVA-1.5) so far")
        return self.view_tokens

    def validate(self) -> None:
        self.vision.validate()
        self.llm.validate()
        _ = self.projector.depth
        _check(self.vision_feature_select in ("default", "full"),
               f"vision_feature_select {self.vision_feature_select!r}")
        n = self.vision.num_layers
        for layer in self.feature_layers:
            _check(-(n + 1) <= layer <= n,
                   f"vision_feature_layer {layer} out of range for {n} layers")
        _check(0 <= self.image_token_id, "image_token_id must be >= 0")
        _check(self.anyres_max >= 0 and (self.anyres or not self.anyres_max),
               "anyres_max needs image_grid_pinpoints")
        s = self.vision.image_size
        for h, w in self.image_grid_pinpoints:
            _check(h > 0 and w > 0 and h % s == 0 and w % s == 0,
                   f"image_grid_pinpoints: ({h}, {w}) is not a multiple of the tower's {s}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
