"""Basic layers with logically named parameters: a linear map, RMSNorm, LayerNorm.

Axis names on parameters are logical ('embed', 'heads', 'mlp', ...); `mmjax.sharding` maps
them onto mesh axes from config.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError

Dtype = jnp.dtype | str
# activations [B, L, D] are constrained to these logical axes at block boundaries
ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: Sequence[str]):
    """Creates a parameter that carries logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


class Linear(nn.Module):
    """y = x @ W (+ b) contracting the trailing `len(in_shape)` axes of x.

    `in_shape`/`out_shape` may hold several axes (e.g. out (N, H) for the query projection), so
    head axes are real parameter axes that the tensor mesh axis can shard.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    # LoRA: a rank-r update alongside the kernel, y += (alpha / r) dropout(x) A B, with
    # A [in..., r] (PEFT's Kaiming-uniform) and B [r, out...] (zeros: training starts at W).
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(self, "kernel", self.kernel_init,
                                 self.in_shape + self.out_shape, self.param_dtype,
                                 self.in_axes + self.out_axes)
        n_in = len(self.in_shape)
        y = _contract(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
        if self.lora_rank:
            y = y + self._lora(x, n_in)
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, self.out_shape,
                                   self.param_dtype, self.out_axes)
            y = y + bias.astype(self.dtype)
        return y

    def _lora(self, x: jax.Array, n_in: int) -> jax.Array:
        r = self.lora_rank
        a = param_with_axes(self, "lora_a", _lora_a_init(math.prod(self.in_shape)),
                            self.in_shape + (r,), self.param_dtype, self.in_axes + ("lora_rank",))
        b = param_with_axes(self, "lora_b", nn.initializers.zeros, (r,) + self.out_shape,
                            self.param_dtype, ("lora_rank",) + self.out_axes)
        if self.lora_dropout and self.has_rng("dropout"):
            x = nn.Dropout(self.lora_dropout, deterministic=False)(x)
        low = _contract(x.astype(self.dtype), a.astype(self.dtype), n_in)  # [..., r]
        return (self.lora_alpha / r) * _contract(low, b.astype(self.dtype), 1)


def _contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """Contracts x's trailing n axes with w's leading n axes."""
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                      ((), ())))


def _lora_a_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)  # torch kaiming_uniform_(a=sqrt(5)), as PEFT initialises A

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, scale in the input dtype (as transformers does)."""

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                                self.param_dtype, (self.axis_name,))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (ViT), statistics in float32."""

    eps: float = 1e-5
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype,
                                (self.axis_name,))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype,
                               (self.axis_name,))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
