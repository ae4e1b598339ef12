"""Every attention implementation this machine can run matches the reference.

CPU runs `xla` and the TPU splash kernel in the Pallas interpreter; `cudnn` runs where an
NVIDIA GPU is present (skipped here otherwise) in float32 and bfloat16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.attention import attention_mask, available_implementations, dot_product_attention

B, T, N, K, H = 2, 256, 4, 2, 32


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype)
               for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)])
    packed = np.zeros((B, T), np.int32)
    packed[0, :100], packed[0, 100:190], packed[0, 190:250] = 1, 2, 3  # 3 samples + padding
    packed[1, :256] = 1
    padded = np.zeros((B, T), np.int32)
    padded[0, :170], padded[1, :256] = 1, 1
    return q, k, v, jnp.asarray(packed), jnp.asarray(padded)


def _close(out, ref, seg, tol):
    m = np.asarray(seg != 0)[:, :, None, None]
    err = np.max(np.abs(np.where(m, np.asarray(out, np.float32) - np.asarray(ref, np.float32), 0)))
    assert err <= tol * np.max(np.abs(np.asarray(ref, np.float32))), err
    # padding rows are defined as zero by every implementation
    assert np.all(np.where(m, 0, np.asarray(out, np.float32)) == 0)


def test_mask_semantics():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    m = np.asarray(attention_mask(seg, seg, causal=True))[0]
    expect = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(m, expect)
    w = np.asarray(attention_mask(jnp.ones((1, 4), int), jnp.ones((1, 4), int), causal=True,
                                  sliding_window=2))[0]
    np.testing.assert_array_equal(w, np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0],
                                               [0, 0, 1, 1]], bool))


def test_packed_equals_separate_samples():
    """A packed row gives each sample exactly what it gets alone."""
    q, k, v, packed, _ = _inputs(jnp.float32)
    out = dot_product_attention(q, k, v, q_segment_ids=packed)
    for lo, hi in [(0, 100), (100, 190), (190, 250)]:
        alone = dot_product_attention(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi],
                                      q_segment_ids=jnp.ones((1, hi - lo), jnp.int32))
        np.testing.assert_allclose(out[:1, lo:hi], alone, atol=1e-6)


CPU_IMPLS = ["xla", "splash_interpret"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("window", [None, 17])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_implementations_match_reference(impl, window, causal):
    q, k, v, packed, _ = _inputs(jnp.float32)
    kw = dict(q_segment_ids=packed, causal=causal, sliding_window=window)
    ref = dot_product_attention(q, k, v, impl="reference", **kw)
    _close(dot_product_attention(q, k, v, impl=impl, **kw), ref, packed, 1e-5)


def test_splash_gradients_match_reference():
    q, k, v, packed, _ = _inputs(jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            dot_product_attention(q, k, v, q_segment_ids=packed, impl=impl) ** 2)

    g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss("splash_interpret"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.skipif("cudnn" not in available_implementations(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 5e-3)])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_cudnn_matches_reference(dtype, tol, layout):
    q, k, v, packed, padded = _inputs(dtype)
    seg = packed if layout == "packed" else padded
    ref = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                v.astype(jnp.float32), q_segment_ids=seg, impl="reference")
    out = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, q_segment_ids=seg, impl="cudnn", packed=layout == "packed"))(q, k, v)
    _close(out, ref, seg, tol)


@pytest.mark.skipif("cudnn" not in available_implementations(), reason="needs an NVIDIA GPU")
def test_cudnn_rejects_float32_with_a_clear_error():
    q, k, v, _, padded = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="cuDNN flash attention runs in bfloat16 or float16"):
        jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, q_segment_ids=padded, impl="cudnn", packed=False))(q, k, v)


@pytest.mark.parametrize("t, causal, window", [(200, True, None), (200, True, 33),
                                                (577, False, None)])
def test_splash_in_shard_map_over_batch_and_heads_with_unaligned_lengths(t, causal, window):
    """On an 8-device mesh (rows over data x fsdp, heads over tensor) the splash kernel runs
    per shard inside a shard_map; lengths that are not a multiple of 128 (200, a ViT's 577)
    are padded with segment 0 and give the reference's result, values and gradients."""
    from mmjax.sharding import LOGICAL_AXIS_RULES, make_mesh, mesh_rules

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(4, t, n, 32)), jnp.float32) for n in (4, 2, 2))
    seg = np.ones((4, t), np.int32)
    seg[0, t // 2:] = 2  # two packed samples
    seg[1, t - 30:] = 0  # right padding
    seg = jnp.asarray(seg)
    kw = dict(q_segment_ids=seg, causal=causal, sliding_window=window)

    def attend(impl):
        return lambda q, k, v: dot_product_attention(q, k, v, impl=impl, **kw)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attend(impl)(q, k, v) ** 2)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh_rules(mesh, LOGICAL_AXIS_RULES):
        lowered = jax.jit(attend("splash_interpret")).lower(q, k, v)
        out = lowered.compile()(q, k, v)
        g = jax.jit(jax.grad(loss("splash_interpret"), argnums=(0, 1, 2)))(q, k, v)
    text = lowered.as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    _close(out, attend("reference")(q, k, v), seg, 1e-5)
    g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.max(jnp.abs(b))))


def test_auto_picks_the_platform_kernel():
    from mmjax.models.attention import resolve_impl
    from mmjax.models.config import RuntimeConfig
    from mmjax.models.runtime import resolve

    assert resolve_impl("auto", jnp.bfloat16, "tpu") == "splash"
    assert resolve_impl("auto", jnp.bfloat16, "gpu", "NVIDIA H100 80GB HBM3") == "cudnn"
    assert resolve_impl("auto", jnp.float32, "gpu", "NVIDIA H100 80GB HBM3") == "xla"
    assert resolve_impl("auto", jnp.bfloat16, "cpu") == "xla"
    assert resolve_impl("reference", jnp.bfloat16, "tpu") == "reference"
    rt = resolve(RuntimeConfig(dtype="bfloat16", remat_policy="auto"), _Device("tpu"))
    assert (rt.attention_impl, rt.remat_policy) == ("splash", "save_qkv")
    assert resolve(RuntimeConfig(remat_policy="auto"), _Device("cpu")).remat_policy == "none"


class _Device:
    def __init__(self, platform: str, device_kind: str = ""):
        self.platform, self.device_kind = platform, device_kind
