"""Rotary position embeddings (RoPE) as in transformers' Llama, with Llama-3 scaling.

Axis legend: B batch, T length, N heads, H head dim.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.config import RopeConfig


def inverse_frequencies(cfg: RopeConfig, head_dim: int) -> np.ndarray:
    """[H/2] inverse frequencies after the configured scaling, in float32 as transformers."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = np.float32(1.0) / (np.float32(cfg.theta) ** exponent)
    if cfg.rope_type == "linear":
        inv = inv / cfg.factor
    elif cfg.rope_type == "llama3":
        low_wavelen = cfg.original_max_position_embeddings / cfg.low_freq_factor
        high_wavelen = cfg.original_max_position_embeddings / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        smooth = (cfg.original_max_position_embeddings / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
    """x [B, T, N, H] rotated by positions [B, T]; computed in float32 like transformers."""
    head_dim = x.shape[-1]
    inv = jnp.asarray(inverse_frequencies(cfg, head_dim), jnp.float32)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)
