"""The key/value cache of the decoder for incremental decoding.

Axis legend: L layers, B rows, S cache slots, K key/value heads, H head dim, T new tokens.

Keys and values are one array per layer, laid out [B, K, S, H]: heads ahead of slots, so
that attention of a new token over the cache is a plain batched matmul over (B, K), and no
layer's cache is ever copied out of a stack (each is updated in place).

Rows are left-padded so that every row writes its next token into the same slot: one
`index` for the batch, with per-row `positions` (a row's first real token is position 0)
and `segment_ids` (1 for a filled slot, 0 for padding and slots not written yet). Masks
come from these (the same segment / causal / window rules as training), so rows of
different prompt lengths share one cache and one compiled step.

Continuous batching (`mmjax.inference.slots`) gives each row its own write slot instead:
`index` [B], each row a request that joined at its own time; the masks are the same.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mmjax.models.config import LLMConfig

CACHE_AXES = ("activation_batch", "kv_heads", "activation_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S, H]
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]
    positions: jax.Array  # int32 [B, S]: the position of the token held in each slot
    segment_ids: jax.Array  # int32 [B, S]: 1 filled, 0 padding or not written yet
    index: jax.Array  # int32 [] the next slot to write, the same for every row; or [B]

    @classmethod
    def empty(cls, cfg: LLMConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, length, cfg.head_size)
        layers = range(cfg.num_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   positions=jnp.zeros((batch, length), jnp.int32),
                   segment_ids=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    def with_tokens(self, positions: jax.Array, segment_ids: jax.Array) -> "KVCache":
        """Records T new tokens' positions / segments [B, T] at `index` (the layers write the
        keys and values; `LLM.decode` moves `index` on after them)."""
        return self.replace(
            positions=write_rows(self.positions, positions.astype(jnp.int32), self.index, 1),
            segment_ids=write_rows(self.segment_ids, (segment_ids != 0).astype(jnp.int32),
                                   self.index, 1))


def write_rows(array: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """`array` [B, ...] with `new` written from slot `index` along `axis`: one slot for every
    row (index []), or each row's own (index [B]; a scatter, in place when donated)."""
    if index.ndim == 0:
        at = [0] * array.ndim
        at[axis] = index
        return jax.lax.dynamic_update_slice(array, new, at)

    def one(row, new_row, i):
        at = [0] * row.ndim
        at[axis - 1] = i
        return jax.lax.dynamic_update_slice(row, new_row, at)

    return jax.vmap(one)(array, new, index)
