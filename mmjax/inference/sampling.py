"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus), per row.

Axis legend: B rows, V vocabulary.

The knobs are arrays, not compile-time constants, so one compiled decoding loop serves every
setting; rows with temperature 0 take the argmax. Sampling draws from the tempered
distribution restricted to the top-k tokens, then to the smallest set whose probability
reaches top-p (the first token always stays), as transformers' warpers do in that order.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a reply is generated."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    stop: tuple[str, ...] = ()  # stop strings (cut from the reply); EOS / end of turn always stop
    logprobs: bool = False  # return each generated token's log-probability

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def knobs(s: Sampling, rows: int) -> dict[str, jax.Array]:
    """The per-row arrays the compiled loop reads."""
    return {"temperature": jnp.full((rows,), s.temperature, jnp.float32),
            "top_k": jnp.full((rows,), s.top_k, jnp.int32),
            "top_p": jnp.full((rows,), s.top_p, jnp.float32)}


def _sample(logits, key, temperature, top_k, top_p):
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    in_k = jnp.arange(v)[None, :] < k[:, None]
    ranked = jnp.where(in_k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
    keep = in_k & (before < top_p[:, None])
    keep = keep.at[:, 0].set(True)
    kept = jnp.sum(keep, axis=-1)
    floor = jnp.take_along_axis(ranked, (kept - 1)[:, None], axis=-1)  # [B, 1]
    masked = jnp.where(scaled >= floor, scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def next_token(logits: jax.Array, key: jax.Array, k: dict[str, jax.Array]) -> jax.Array:
    """logits [B, V] float32 -> token ids [B]."""
    return _choose(logits, k, lambda: _sample(logits, key, k["temperature"], k["top_k"],
                                              k["top_p"]))


def next_token_rows(logits: jax.Array, keys: jax.Array, k: dict[str, jax.Array]) -> jax.Array:
    """logits [B, V] float32, keys [B] (a PRNG key per row, so that a row's draws do not
    depend on which rows share the batch) -> token ids [B]."""
    def one(row, key, t, top_k, top_p):
        return _sample(row[None], key, t[None], top_k[None], top_p[None])[0]

    return _choose(logits, k, lambda: jax.vmap(one)(logits, keys, k["temperature"],
                                                    k["top_k"], k["top_p"]))


def _choose(logits, k, sample) -> jax.Array:
    """The argmax for rows at temperature 0, `sample()` for the others (computed only when
    some row samples)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = k["temperature"] > 0
    return jnp.where(sampling, jax.lax.cond(jnp.any(sampling), sample, lambda: greedy), greedy)
