"""ViT image encoders: CLIP (class token, pre-LayerNorm, quick-GELU) and SigLIP.

Axis legend: B images, Y/X image height/width, C channels, p/q patch height/width,
L patches (+1 with a class token), D width, N heads, H head dim, F MLP hidden.

Parameter names mirror transformers' vision models (`layers_{i}/self_attn/q_proj`, `mlp/fc1`).
Only `depth` encoder layers are built: LLaVA reads an inner layer (-2), so the layers above
it (and the post-LayerNorm) need no memory and no compute.
"""
from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mmjax.models.attention import dot_product_attention
from mmjax.models.config import RuntimeConfig, VisionConfig
from mmjax.models.layers import ACT_AXES, LayerNorm, Linear, activation, param_with_axes
from mmjax.models.llm import LayerStack


class VisionAttention(nn.Module):
    cfg: VisionConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x):
        """Bidirectional attention: x [B, L, D] -> [B, L, D]."""
        c = self.cfg
        kw = dict(dtype=self.rt.dtype, param_dtype=self.rt.param_dtype, use_bias=True)
        d, nh = (c.hidden_size,), (c.num_heads, c.head_dim)
        q = Linear(d, nh, ("embed",), ("heads", "head_dim"), name="q_proj", **kw)(x)
        k = Linear(d, nh, ("embed",), ("heads", "head_dim"), name="k_proj", **kw)(x)
        v = Linear(d, nh, ("embed",), ("heads", "head_dim"), name="v_proj", **kw)(x)
        segments = jnp.ones(x.shape[:2], jnp.int32)
        # splash pads the 577 / 729 tokens to a multiple of 128 (segment 0) itself
        out = dot_product_attention(q, k, v, q_segment_ids=segments, causal=False,
                                    impl=self.rt.attention_impl, packed=False)
        return Linear(nh, d, ("heads", "head_dim"), ("embed",), name="out_proj", **kw)(out)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.rt.dtype, param_dtype=self.rt.param_dtype, use_bias=True)
        h = Linear((c.hidden_size,), (c.intermediate_size,), ("embed",), ("mlp",), name="fc1",
                   **kw)(x)
        h = checkpoint_name(activation(c.hidden_act)(h), "mlp_hidden")
        return Linear((c.intermediate_size,), (c.hidden_size,), ("mlp",), ("embed",), name="fc2",
                      **kw)(h)


class EncoderLayer(nn.Module):
    cfg: VisionConfig
    rt: RuntimeConfig
    scanned: bool = False
    collect: bool = False

    @nn.compact
    def __call__(self, x):
        norm = dict(eps=self.cfg.layer_norm_eps, dtype=self.rt.dtype,
                    param_dtype=self.rt.param_dtype)
        x = nn.with_logical_constraint(x, ACT_AXES)
        x = x + VisionAttention(self.cfg, self.rt, name="self_attn")(
            LayerNorm(name="layer_norm1", **norm)(x))
        x = x + VisionMLP(self.cfg, self.rt, name="mlp")(LayerNorm(name="layer_norm2", **norm)(x))
        x = nn.with_logical_constraint(checkpoint_name(x, "layer_out"), ACT_AXES)
        return (x, x if self.collect else None) if self.scanned else x


def sincos_2d_init(has_cls: bool, temperature: float = 10_000.0):
    """Initialiser of a tower's position embedding [L, D]: 2-D sine-cosine of each patch's
    row and column (big_vision's `posemb_sincos_2d`, MAE's), zero for the class token.

    Used only when a tower starts from random weights (imported towers bring their own
    embedding). With the usual normal(0.02) start, a position is ~25 times smaller than a
    patch's content (normal(0.02) over 588 pixel values), so a tower trained from scratch
    starts out blind to where a patch lies, and nothing in LLaVA's stage 1 makes it learn
    that: its LLM can read a patch's place from its position in the token sequence."""

    def init(key, shape, dtype=jnp.float32):
        del key  # deterministic
        n, d = shape
        side = math.isqrt(n - has_cls)
        if side * side != n - has_cls:
            raise ValueError(f"position embedding of {n} rows is not a square grid")
        quarter = d // 4
        omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
        y, x = np.mgrid[:side, :side]
        y = y.reshape(-1, 1) * omega[None]
        x = x.reshape(-1, 1) * omega[None]
        pe = np.zeros((n, d), np.float32)
        pe[has_cls:, :4 * quarter] = np.concatenate(
            [np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
        return jnp.asarray(pe, dtype)

    return init


class VisionTower(nn.Module):
    """Patchify + position embedding (+ class token) and `depth` encoder layers.

    Returns every hidden state it computed, stacked: [depth + 1, B, L, D] (index 0 is the
    embedding output, as transformers' `hidden_states`), or with `keep` only those indices,
    [len(keep), B, L, D]; with `post_norm` also the final LayerNorm of the last one
    (transformers' `last_hidden_state`) as a second output. Keeping only the last layer
    (LLaVA's case: the tower is built up to the layer it reads) stacks nothing, so neither
    the forward nor a scanned stack holds the other layers' outputs.
    """

    cfg: VisionConfig
    rt: RuntimeConfig = RuntimeConfig()
    depth: int | None = None
    keep: tuple[int, ...] | None = None  # hidden-state indices to return (None: all)

    @property
    def num_layers_built(self) -> int:
        return self.cfg.num_layers if self.depth is None else self.depth

    @nn.compact
    def __call__(self, pixels: jax.Array, post_norm: bool = False):
        """pixels [B, Y, X, C] normalised float -> hidden states [depth+1, B, L, D]."""
        c, rt = self.cfg, self.rt
        p = c.patch_size
        grid = (c.image_size // p) * p  # a strided conv ignores the remainder (384 -> 378)
        pixels = pixels[:, :grid, :grid]
        patches = einops.rearrange(pixels.astype(rt.dtype), "B (y p) (x q) C -> B (y x) p q C",
                                   p=p, q=p)
        x = Linear((p, p, 3), (c.hidden_size,), ("patch_y", "patch_x", "channel"), ("embed",),
                   use_bias=c.family == "siglip", dtype=rt.dtype, param_dtype=rt.param_dtype,
                   name="patch_embedding")(patches)
        init = nn.initializers.normal(0.02)
        if c.has_cls:
            cls = param_with_axes(self, "class_embedding", init, (c.hidden_size,),
                                  rt.param_dtype, ("embed",))
            cls = jnp.broadcast_to(cls.astype(rt.dtype), (x.shape[0], 1, c.hidden_size))
            x = jnp.concatenate([cls, x], axis=1)
        pos = param_with_axes(self, "position_embedding", sincos_2d_init(c.has_cls),
                              (x.shape[1], c.hidden_size), rt.param_dtype, ("length", "embed"))
        x = x + pos.astype(rt.dtype)[None]
        norm = dict(eps=c.layer_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        if c.family == "clip":
            x = LayerNorm(name="pre_layernorm", **norm)(x)
        n = self.num_layers_built
        keep = tuple(range(n + 1)) if self.keep is None else tuple(self.keep)
        if max(keep) > n:
            raise ValueError(f"hidden state {max(keep)} asked of a tower of {n} layers")
        if set(keep) <= {0, n}:  # the embeddings and/or the last layer: nothing to collect
            last = LayerStack(EncoderLayer, n, rt, dict(cfg=c, rt=rt), name="layers")(x) \
                if n else x
            hidden_states = jnp.stack([x if i == 0 else last for i in keep])
        else:
            layers = LayerStack(EncoderLayer, n, rt, dict(cfg=c, rt=rt), collect=True,
                                name="layers")
            _, states = layers(x)  # [n, B, L, D]
            hidden_states = jnp.stack([x if i == 0 else states[i - 1] for i in keep])
        if post_norm:
            return hidden_states, LayerNorm(name="post_layernorm", **norm)(hidden_states[-1])
        return hidden_states
