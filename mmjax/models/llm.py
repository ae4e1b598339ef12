"""Llama-family decoder: Llama-2/Vicuna, Llama-3/3.1, Mistral, Qwen2/2.5.

Axis legend: B batch, T length, D d_model, N query heads, K key/value heads, H head dim,
F MLP hidden, V vocabulary, L layers.

Parameters mirror transformers' names (`layers_{i}/self_attn/q_proj/kernel`, ...), stacked
along a leading 'layers' axis (`layers/...`) when `scan_layers` is set.

Decoding passes a `KVCache` (mmjax.models.kv_cache): each layer writes the new tokens' keys
and values into its slice of the cache, in place, and attends over the cache. A `prefill`
call fills an empty cache and attends over its own tokens with the configured kernel; later
calls attend over the cache with the mask-based kernels. The cache runs unscanned
(`unstack_layers` turns scanned parameters into per-layer ones).
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmjax.models.attention import cached_attention, dot_product_attention
from mmjax.models.config import LLMConfig, RuntimeConfig
from mmjax.models.kv_cache import CACHE_AXES, KVCache, write_rows
from mmjax.models.layers import ACT_AXES, Linear, RMSNorm, param_with_axes
from mmjax.models.remat import remat_block
from mmjax.models.rotary import apply_rope


class Attention(nn.Module):
    cfg: LLMConfig
    rt: RuntimeConfig
    layer_index: int = 0  # this layer's slice of a KV cache
    prefill: bool = False  # with a cache: fill an empty one, attending over the new tokens

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache: KVCache | None = None):
        """x [B, T, D], positions/segment_ids [B, T] -> [B, T, D] (and this layer's cache
        k, v [B, K, S, H] with the new keys and values written in)."""
        c, dt, pdt = self.cfg, self.rt.dtype, self.rt.param_dtype
        d, h = c.hidden_size, c.head_size
        kw = dict(dtype=dt, param_dtype=pdt)
        q = Linear((d,), (c.num_heads, h), ("embed",), ("heads", "head_dim"), c.qkv_bias,
                   name="q_proj", **kw, **self.rt.lora("q_proj"))(x)
        k = Linear((d,), (c.num_kv_heads, h), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias,
                   name="k_proj", **kw, **self.rt.lora("k_proj"))(x)
        v = Linear((d,), (c.num_kv_heads, h), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias,
                   name="v_proj", **kw, **self.rt.lora("v_proj"))(x)
        q = checkpoint_name(apply_rope(q, positions, c.rope), "query_proj")
        k = checkpoint_name(apply_rope(k, positions, c.rope), "key_proj")
        v = checkpoint_name(v, "value_proj")
        impl = self.rt.attention_impl
        if cache is None or self.prefill:
            out = dot_product_attention(q, k, v, q_segment_ids=segment_ids, causal=True,
                                        sliding_window=c.sliding_window, impl=impl)
        if cache is not None:
            i = self.layer_index
            k_all = _write_layer(cache.k[i], k, cache.index)
            v_all = _write_layer(cache.v[i], v, cache.index)
            if not self.prefill:
                out = cached_attention(
                    q, k_all, v_all, q_segment_ids=segment_ids,
                    kv_segment_ids=cache.segment_ids, q_positions=positions,
                    kv_positions=cache.positions, sliding_window=c.sliding_window)
        out = checkpoint_name(out, "context")
        out = Linear((c.num_heads, h), (d,), ("heads", "head_dim"), ("embed",),
                     c.attention_out_bias, name="o_proj", **kw, **self.rt.lora("o_proj"))(out)
        return out if cache is None else (out, k_all, v_all)


def _put(layers: tuple, i: int, value) -> tuple:
    return layers[:i] + (value,) + layers[i + 1:]


def _write_layer(layer_cache, new, index):
    """layer_cache [B, K, S, H] with new [B, T, K, H] written at slot `index` ([] or [B])."""
    new = jnp.swapaxes(new.astype(layer_cache.dtype), 1, 2)  # [B, K, T, H]
    layer_cache = write_rows(layer_cache, new, index, 2)
    return nn.with_logical_constraint(layer_cache, CACHE_AXES)


class MLP(nn.Module):
    cfg: LLMConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x):
        """SwiGLU: x [B, T, D] -> [B, T, D]."""
        c = self.cfg
        kw = dict(dtype=self.rt.dtype, param_dtype=self.rt.param_dtype, use_bias=c.mlp_bias)
        d, f = (c.hidden_size,), (c.intermediate_size,)
        lora = self.rt.lora
        gate = Linear(d, f, ("embed",), ("mlp",), name="gate_proj", **kw, **lora("gate_proj"))(x)
        up = Linear(d, f, ("embed",), ("mlp",), name="up_proj", **kw, **lora("up_proj"))(x)
        hidden = checkpoint_name(jax.nn.silu(gate) * up, "mlp_hidden")
        return Linear(f, d, ("mlp",), ("embed",), name="down_proj", **kw,
                      **lora("down_proj"))(hidden)


class DecoderLayer(nn.Module):
    cfg: LLMConfig
    rt: RuntimeConfig
    scanned: bool = False
    collect: bool = False
    layer_index: int = 0
    prefill: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache: KVCache | None = None):
        norm = dict(eps=self.cfg.rms_norm_eps, dtype=self.rt.dtype, param_dtype=self.rt.param_dtype)
        x = nn.with_logical_constraint(x, ACT_AXES)
        attn = Attention(self.cfg, self.rt, self.layer_index, self.prefill, name="self_attn")(
            RMSNorm(name="input_layernorm", **norm)(x), positions, segment_ids, cache)
        if cache is not None:
            attn, k_all, v_all = attn
        h = x + attn
        out = h + MLP(self.cfg, self.rt, name="mlp")(RMSNorm(name="post_attention_layernorm",
                                                            **norm)(h))
        out = nn.with_logical_constraint(checkpoint_name(out, "layer_out"), ACT_AXES)
        if cache is not None:
            i = self.layer_index
            return out, cache.replace(k=_put(cache.k, i, k_all), v=_put(cache.v, i, v_all))
        return (out, out if self.collect else None) if self.scanned else out


@flax.struct.dataclass
class Output:
    """What a forward returns, whatever it was asked: one structure (gemma's shape)."""

    hidden: jax.Array  # [B, T, D] the final hidden states (after the last norm)
    logits: jax.Array | None = None  # [B, T, V] float32; None when asked for no head
    cache: KVCache | None = None  # decoding: the cache with this call's tokens appended


class LLM(nn.Module):
    """The decoder: `embed` token ids, then `decode` embeddings into logits."""

    cfg: LLMConfig
    rt: RuntimeConfig = RuntimeConfig()

    def setup(self):
        c, rt = self.cfg, self.rt
        self.embed_tokens = param_with_axes(
            self, "embed_tokens", nn.initializers.normal(0.02),
            (c.vocab_size, c.hidden_size), rt.param_dtype, ("vocab", "embed"))
        self.layers = LayerStack(DecoderLayer, c.num_layers, rt, dict(cfg=c, rt=rt))
        self.norm = RMSNorm(eps=c.rms_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = OutputHead(c.hidden_size, c.vocab_size, rt.param_dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        """ids [B, T] -> [B, T, D] in the compute dtype."""
        # Gather from the table with its model dim whole (FSDP gathers weights for use
        # anyway); a table split on the same mesh axis as the batch makes GSPMD replicate.
        table = nn.with_logical_constraint(self.embed_tokens, ("vocab", None))
        x = jnp.take(table, ids, axis=0).astype(self.rt.dtype)
        return nn.with_logical_constraint(x, ACT_AXES)

    def decode(self, x, positions, segment_ids, cache: KVCache | None = None,
               prefill: bool = False, last_only: bool = False, head: bool = True) -> Output:
        """x [B, T, D] embeddings -> `Output`: the final hidden states [B, T, D], the logits
        [B, T, V] float32 unless `head=False` (the training loss applies `head_weight` in
        chunks), and with a cache the cache with the T tokens appended (`prefill` for the
        first call on an empty cache). `last_only` keeps the last position only ([B, 1, ...]:
        left-padded prompts end together)."""
        if cache is not None:
            cache = cache.with_tokens(positions, segment_ids)
            x, cache = self.layers(x, positions, segment_ids, cache=cache, prefill=prefill)
            cache = cache.replace(index=cache.index + x.shape[1])
        else:
            x = self.layers(x, positions, segment_ids)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = head_logits(x, self.head_weight(), self.rt.dtype) if head else None
        return Output(hidden=x, logits=logits, cache=cache)

    def head_weight(self) -> jax.Array:
        """The output projection W [D, V] in the parameter dtype (the embedding table's
        transpose when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.T
        return self.lm_head()

    def __call__(self, ids, positions=None, segment_ids=None) -> Output:
        """ids [B, T] -> `Output` (logits [B, T, V]); positions default to 0..T-1, segments
        to one sample."""
        positions, segment_ids = default_positions(ids, positions, segment_ids)
        return self.decode(self.embed(ids), positions, segment_ids)


class OutputHead(nn.Module):
    """The untied output projection's parameter, `lm_head/kernel` [D, V]."""

    d: int
    v: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self) -> jax.Array:
        return param_with_axes(self, "kernel", nn.initializers.normal(0.02), (self.d, self.v),
                               self.param_dtype, ("embed", "vocab"))


LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")


def head_logits(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [B, T, D] final hidden states, w [D, V] -> logits [B, T, V] float32 (the matmul
    in the compute dtype)."""
    logits = jnp.einsum("BTD,DV->BTV", x.astype(dtype), w.astype(dtype))
    return nn.with_logical_constraint(logits.astype(jnp.float32), LOGIT_AXES)


def default_positions(ids, positions, segment_ids):
    if segment_ids is None:
        segment_ids = jnp.ones(ids.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    return positions, segment_ids


class LayerStack(nn.Module):
    """`num_layers` copies of `layer_cls` under the configured remat policy, scanned or not.

    Unscanned parameters live under `layers_{i}/...`; scanned ones under `layer/...` with a
    leading 'layers' axis. Layer classes take `scanned` and `collect` flags and, scanned,
    return (x, x if collect else None) as `nn.scan` wants. With `collect` the stack also
    returns every layer's output, stacked [L, ...].
    """

    layer_cls: type
    num_layers: int
    rt: RuntimeConfig
    kwargs: dict
    collect: bool = False

    @nn.compact
    def __call__(self, x, *args, cache: KVCache | None = None, prefill: bool = False):
        block = remat_block(self.layer_cls, self.rt.remat_policy, scanned=self.rt.scan_layers)
        if cache is not None:
            if self.rt.scan_layers:
                raise ValueError("a KV cache runs unscanned layers: load the parameters with "
                                 "scan_layers=False (mmjax.models.llm.unstack_layers)")
            for i in range(self.num_layers):
                x, cache = block(**self.kwargs, layer_index=i, prefill=prefill,
                                 name=f"layers_{i}")(x, *args, cache)
            return x, cache
        if not self.rt.scan_layers:
            outs = []
            for i in range(self.num_layers):
                x = block(**self.kwargs, name=f"layers_{i}")(x, *args)
                outs.append(x)
            return (x, jnp.stack(outs)) if self.collect else x
        scanned = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})
        x, outs = scanned(**self.kwargs, scanned=True, collect=self.collect, name="layer")(x, *args)
        return (x, outs) if self.collect else x


def unstack_layers(params: dict) -> dict:
    """Parameters with every scanned stack (`layer/...` with a leading 'layers' axis) split
    into per-layer trees `layers_{i}/...` (what unscanned modules read)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for k, v in params.items():
        if k == "layer" and isinstance(v, dict):
            n = jax.tree_util.tree_leaves(v)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], v)
        else:
            out[k] = unstack_layers(v)
    return out
