"""The forward on an 8-device CPU mesh (data x fsdp x tensor) equals the unsharded one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from jitted import forward

from hf_fixtures import llava_config, make_model, normalize, real_images, rel_err, save
from mmjax.hf import load
from mmjax.models.config import RuntimeConfig
from mmjax.sharding import LOGICAL_AXIS_RULES as RULES
from mmjax.sharding import batch_sharding, make_mesh, mesh_rules


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    model = make_model(tf.LlavaForConditionalGeneration, llava_config("clip", "llama"))
    return save(model, tmp_path_factory.mktemp("llava"))


def _batch(cfg):
    p = cfg.image_tokens
    t = p + 16
    ids = np.random.default_rng(3).integers(0, 120, (4, t))
    ids[:3, 1:1 + p] = cfg.image_token_id  # row 3 is text only
    seg = np.ones((4, t), np.int32)
    seg[1, t - 5:] = 0
    pixels = normalize(real_images(cfg.vision.image_size), cfg.vision.image_mean,
                       cfg.vision.image_std)
    slots = np.zeros((4, 1) + pixels.shape[1:], np.float32)
    slots[:3, 0] = pixels
    pos = np.broadcast_to(np.arange(t), ids.shape).copy()
    return ids, slots, pos, seg


def test_make_mesh_fills_free_axis():
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"data": 4, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_equals_unsharded(llava_dir, scan):
    rt = RuntimeConfig(scan_layers=scan)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load(llava_dir, rt, mesh=mesh, rules=RULES)
    single = load(llava_dir, rt)
    # Parameters really are distributed: FSDP on the model dim, tensor on heads.
    q = sharded.params["language_model"]["layers"]
    q = (q["layer"] if scan else q["layers_0"])["self_attn"]["q_proj"]["kernel"]
    spec = tuple(q.sharding.spec)
    assert "fsdp" in spec and "tensor" in spec
    assert q.addressable_shards[0].data.size == q.size // 4

    ids, slots, pos, seg = _batch(sharded.config)
    ref = forward(single.model, {"params": single.params},
                             *map(jnp.asarray, (ids, slots, pos, seg))).logits

    with mesh_rules(mesh, RULES):
        inputs = [jax.device_put(x, batch_sharding(mesh, x.ndim, RULES))
                  for x in (ids, slots, pos, seg)]
        fwd = jax.jit(lambda p, *a: sharded.model.apply({"params": p}, *a).logits)
        out = fwd(sharded.params, *inputs)
        assert out.sharding.spec[0] == ("data", "fsdp")
    assert rel_err(out, ref, seg.astype(bool)) < 1e-5


def test_logical_rules_come_from_config(llava_dir):
    """Swapping the rules moves parameters to other mesh axes: nothing is hard-coded."""
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = tuple((k, None) if k in ("heads", "kv_heads", "mlp", "vocab") else (k, v)
                  for k, v in RULES)
    imported = load(llava_dir, mesh=mesh, rules=rules)
    up = imported.params["language_model"]["layers"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert tuple(up.sharding.spec) == ("fsdp", None)
    boxed = nn.get_partition_spec(
        jax.eval_shape(lambda: imported.model.init(jax.random.key(0), jnp.zeros((1, 4), int))))
    assert boxed["params"]["language_model"]["layers"]["layers_0"]["mlp"]["up_proj"][
        "kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
