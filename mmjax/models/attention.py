"""Dot-product attention with one interface and several kernels.

Axis legend: B batch, T query length, S key/value length, N query heads, K key/value heads,
G query heads per key/value head (N = K * G), H head dim.

Masking is described by data, not by a dense mask: `segment_ids` (int [B, T], 0 = padding)
let tokens attend only within their own sample, so packed sequences (several samples in one
row) and padded batches use the same call; `causal` adds the causal constraint and
`sliding_window` a left window (Mistral). Every implementation computes the same function:

- `reference`: einsum + softmax in float32; runs everywhere, the ground truth in tests.
- `xla`: `jax.nn.dot_product_attention(implementation='xla')` with a boolean mask.
- `cudnn`: cuDNN flash attention (NVIDIA GPUs). Rows with a single sample (padding on the
  right only) use cuDNN's padding-causal mask; packed rows pass the segment mask as a bias.
- `splash`: the Pallas splash-attention kernel for TPU, with segment ids handed to the
  kernel, inside a shard_map over the mesh's batch and head axes; `splash_interpret` runs
  the same kernel in the Pallas interpreter (CPU tests).
- `auto` (the default): splash on TPU, cuDNN on NVIDIA GPUs in bfloat16 / float16, xla
  elsewhere (`resolve_impl`).
"""
from __future__ import annotations

from typing import Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention_mask(
    q_segment_ids: jax.Array,  # [B, T]
    kv_segment_ids: jax.Array,  # [B, S]
    *,
    causal: bool,
    sliding_window: Optional[int] = None,
    q_positions: Optional[jax.Array] = None,  # [B, T]
    kv_positions: Optional[jax.Array] = None,  # [B, S]
) -> jax.Array:
    """Boolean mask [B, T, S]: same non-zero segment, causal and windowed if asked.

    Causality and windows use the token order within the row (packed samples are laid out
    one after another), or the given positions when both are passed.
    """
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        kv_segment_ids[:, None, :] != 0
    )
    if causal or sliding_window:
        t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        qi = jnp.arange(t)[None, :] if q_positions is None else q_positions
        ki = jnp.arange(s)[None, :] if kv_positions is None else kv_positions
        delta = qi[:, :, None] - ki[:, None, :]  # [B|1, T, S]
        if causal:
            mask &= delta >= 0
        if sliding_window:
            mask &= delta < sliding_window
    return mask


def reference_attention(q, k, v, mask, scale):
    """q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H]; float32 softmax."""
    num_kv = k.shape[2]
    qg = einops.rearrange(q, "B T (K G) H -> B T K G H", K=num_kv)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return einops.rearrange(out, "B T K G H -> B T (K G) H")


def _xla_attention(q, k, v, mask, scale):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation="xla")


def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, scale, causal, sliding_window,
                     packed):
    window = (sliding_window - 1, 0) if sliding_window else None
    if packed:
        mask = attention_mask(q_segment_ids, kv_segment_ids, causal=False)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, is_causal=causal,
            local_window_size=window, implementation="cudnn")
    # One sample per row, padded on the right: lengths describe the mask exactly.
    q_len = jnp.sum(q_segment_ids != 0, axis=1).astype(jnp.int32)
    kv_len = jnp.sum(kv_segment_ids != 0, axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, local_window_size=window, implementation="cudnn")


SPLASH_ALIGN = 128  # the kernel's block sizes (and so its lengths) are multiples of this


def _splash_block(t: int, s: int, preferred: int = 512) -> int:
    """The largest block <= `preferred` (a multiple of 128) that divides both lengths."""
    b = preferred
    while b > SPLASH_ALIGN and (t % b or s % b):
        b //= 2
    return b


def _splash_kernel(num_heads_per_kv, t, s, causal, sliding_window, interpret, block):
    # the TPU kernels are imported where they run: an optional part of JAX's experimental
    # tree, which moves between releases (jax 0.10 here, 0.11 on the GPU image)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm


    if sliding_window:
        head = sm.LocalMask((t, s), window_size=(sliding_window - 1, 0 if causal else None),
                            offset=0)
    elif causal:
        head = sm.CausalMask((t, s))
    else:
        head = sm.FullMask((t, s))
    mask = sm.MultiHeadMask([head] * num_heads_per_kv)
    b = block
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # GQA: one MQA kernel per key/value head, over that head's group of query heads.
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _pad_to(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _splash_specs(q, k):
    """PartitionSpecs of (q, k/v, segment ids) over the current mesh: rows over the batch
    axes and heads over the head axes of the logical rules, where they divide; None when
    no mesh is set (one device, or the caller's own shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch, heads = nn.logical_to_mesh_axes(("activation_batch", "heads"))
    kv_heads = nn.logical_to_mesh_axes(("kv_heads",))[0]

    def ways(axes):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return int(np.prod([mesh.shape[a] for a in names])) if names else 1

    if q.shape[0] % ways(batch):
        batch = None
    if heads != kv_heads or k.shape[2] % ways(kv_heads) or q.shape[2] % ways(heads):
        heads = kv_heads = None  # the groups of query heads must stay with their kv head
    return (mesh, P(batch, None, heads, None), P(batch, None, kv_heads, None),
            P(batch, None))


def _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, scale, causal, sliding_window,
                      interpret, block=512):
    """The splash kernel per (row, kv head), over block-aligned lengths (zero-padded with
    segment 0 when a length is not a multiple of 128), inside a shard_map over the mesh's
    batch and head axes: Mosaic kernels are not partitioned by XLA."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    t, s = q.shape[1], k.shape[1]
    tp, sp = -(-t // SPLASH_ALIGN) * SPLASH_ALIGN, -(-s // SPLASH_ALIGN) * SPLASH_ALIGN
    b = _splash_block(tp, sp, block)
    q, q_segment_ids = _pad_to(q, tp), _pad_to(q_segment_ids, tp)
    k, v, kv_segment_ids = _pad_to(k, sp), _pad_to(v, sp), _pad_to(kv_segment_ids, sp)
    q = q * jnp.asarray(scale, q.dtype)

    def local(q, k, v, qs, ks):  # this shard's rows and heads
        # made inside the trace that uses it (not cached): the kernel stages its mask tables
        # as constants of the current trace
        num_kv = k.shape[2]
        kernel = _splash_kernel(q.shape[2] // num_kv, tp, sp, causal, sliding_window,
                                interpret, b)
        qg = einops.rearrange(q, "B T (K G) H -> B K G T H", K=num_kv)
        kk = einops.rearrange(k, "B S K H -> B K S H")
        vv = einops.rearrange(v, "B S K H -> B K S H")

        def one(qh, kh, vh, qsi, ksi):  # qh [G T H], kh/vh [S H]
            return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qsi, kv=ksi))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over K
        out = jax.vmap(per_head)(qg, kk, vv, qs, ks)  # [B K G T H]
        return einops.rearrange(out, "B K G T H -> B T (K G) H")

    specs = _splash_specs(q, k)
    if specs is None:
        out = local(q, k, v, q_segment_ids, kv_segment_ids)
    else:
        mesh, q_spec, kv_spec, seg_spec = specs
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec,
                                                        seg_spec),
                            out_specs=q_spec, check_vma=False)(
            q, k, v, q_segment_ids, kv_segment_ids)
    return out[:, :t]


def dot_product_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    q_segment_ids: jax.Array,  # [B, T], 0 = padding
    kv_segment_ids: Optional[jax.Array] = None,  # [B, S]; defaults to q_segment_ids
    causal: bool = True,
    sliding_window: Optional[int] = None,
    scale: Optional[float] = None,
    impl: str = "reference",
    packed: bool = True,
) -> jax.Array:
    """Attention of q over k/v within segments; returns [B, T, N, H] in q's dtype.

    `packed=False` promises one sample per row with padding only on the right, which lets
    the cuDNN path use its cheaper length-based mask; other kernels ignore it.
    """
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_impl(impl, q.dtype)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if impl == "reference":
        mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal,
                              sliding_window=sliding_window)
        out = reference_attention(q, k, v, mask, scale)
    elif impl == "xla":
        mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal,
                              sliding_window=sliding_window)
        out = _xla_attention(q, k, v, mask, scale)
    elif impl == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN flash attention runs in bfloat16 or float16, got {q.dtype}: "
                             "set dtype='bfloat16' or use attention_impl='xla'")
        out = _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, scale, causal,
                               sliding_window, packed)
    elif impl in ("splash", "splash_interpret"):
        out = _splash_attention(q, k, v, q_segment_ids, kv_segment_ids, scale, causal,
                                sliding_window, interpret=impl == "splash_interpret")
    else:
        raise ValueError(f"unknown attention implementation {impl!r}")
    # Padding queries (segment 0) attend to nothing; kernels differ on what they leave
    # there (uniform average, undefined, padding-to-padding), so define it as zero.
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def cached_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, K, S, H]: a KV cache's layout (key/value heads before slots)
    v: jax.Array,  # [B, K, S, H]
    *,
    q_segment_ids: jax.Array,  # [B, T]
    kv_segment_ids: jax.Array,  # [B, S]
    q_positions: jax.Array,  # [B, T]
    kv_positions: jax.Array,  # [B, S]
    sliding_window: Optional[int] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """The reference attention for decoding against a KV cache: causal and windowed by
    position, float32 softmax. With heads ahead of slots in the cache, both contractions are
    plain batched matmuls over (B, K) (several times faster on CPU than the [B, S, K, H]
    layout for one query token)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal=True,
                          sliding_window=sliding_window, q_positions=q_positions,
                          kv_positions=kv_positions)
    qg = einops.rearrange(q, "B T (K G) H -> B K G T H", K=k.shape[1])
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits * scale, _MASK_VALUE)
    # the probabilities in the wider of the cache's and the query's types: a bfloat16 cache
    # under a float32 model is widened as it is read, not the probabilities narrowed
    probs = jax.nn.softmax(logits, axis=-1).astype(jnp.promote_types(v.dtype, q.dtype))
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v)
    out = einops.rearrange(out, "B K G T H -> B T (K G) H")
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def resolve_impl(impl: str, dtype, platform: Optional[str] = None,
                 device_kind: Optional[str] = None) -> str:
    """`auto` -> the kernel for the platform (default: the default backend's) and dtype:
    splash on TPU, cudnn on NVIDIA GPUs in bfloat16 / float16, xla elsewhere. Other names
    are returned as they are."""
    if impl != "auto":
        return impl
    if platform is None:
        platform = jax.default_backend()
        device_kind = jax.devices()[0].device_kind if platform == "gpu" else device_kind
    if platform == "tpu":
        return "splash"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform in ("gpu", "cuda") and half and "nvidia" in (device_kind or "nvidia").lower():
        return "cudnn"
    return "xla"


def available_implementations() -> list[str]:
    """The kernels this machine can run (reference and xla always)."""
    impls = ["reference", "xla"]
    device = jax.devices()[0]
    if device.platform == "gpu" and "nvidia" in device.device_kind.lower():
        impls.append("cudnn")
    if device.platform == "tpu":
        impls.append("splash")
    return impls
