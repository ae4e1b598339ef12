"""Multimodal projector: `linear` or `mlp{N}x_gelu` (LLaVA-1.5: mlp2x_gelu).

Axis legend: B images, L patches, E vision width (times the number of feature layers), D LLM
width. Parameters `linear_{k}` match transformers' `multi_modal_projector.linear_{k}`.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from mmjax.models.config import ProjectorConfig, RuntimeConfig
from mmjax.models.layers import Linear


class Projector(nn.Module):
    cfg: ProjectorConfig
    in_dim: int
    out_dim: int
    rt: RuntimeConfig = RuntimeConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, L, E] -> [B, L, D]."""
        kw = dict(dtype=self.rt.dtype, param_dtype=self.rt.param_dtype, use_bias=self.cfg.bias)
        x = Linear((self.in_dim,), (self.out_dim,), ("vision_out",), ("embed",), name="linear_1",
                   **kw)(x)
        for k in range(2, self.cfg.depth + 1):
            x = jax.nn.gelu(x, approximate=False)
            x = Linear((self.out_dim,), (self.out_dim,), ("mlp",), ("embed",), name=f"linear_{k}",
                       **kw)(x)
        return x
