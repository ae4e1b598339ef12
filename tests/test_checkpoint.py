"""Orbax checkpoints: restore onto another mesh; partial restore of one part, checked."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training_step import MODEL, _batch, _run, _setup

from mmjax import batch as batch_format
from mmjax.sharding import LOGICAL_AXIS_RULES as RULES
from mmjax.sharding import logical_shardings, make_mesh, with_shardings
from mmjax.training.checkpoint import CheckpointConfig, Checkpointer, restore_subtree


def _abstract(trainer, mesh):
    boxed = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros((1, 20), jnp.int32),
                                              jnp.zeros((1, 1, 56, 56, 3))))["params"]
    return boxed, trainer.state_shardings(logical_shardings(boxed, mesh, RULES), nn.unbox(boxed))


def test_save_on_fsdp8_restore_on_fsdp4_tensor2(tmp_path):
    trainer, state, step, mesh = _setup(mesh=make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    state, _ = _run(step, state, mesh, [_batch()])
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_interval=1))
    ckpt.save(1, state)
    ckpt.wait()
    other = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, shardings = _abstract(trainer, other)
    restored = ckpt.restore(1, with_shardings(jax.eval_shape(lambda: state),
                                                       shardings))
    q = restored.params["language_model"]["layers"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec)[:2] == ("fsdp", "tensor") and q.sharding.mesh == other
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(
            jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
    # the restored state trains on the new mesh
    step2 = trainer.jit_step(shardings, batch_format.shardings(other, RULES))
    _run(step2, restored, other, [_batch(seed=1)])


def test_partial_restore_checks_every_leaf(tmp_path):
    trainer, state, step, mesh = _setup()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_interval=1))
    ckpt.save(1, state)
    ckpt.wait()
    boxed, shardings = _abstract(trainer, mesh)
    abstract = with_shardings(nn.unbox(boxed), shardings.params)
    proj = restore_subtree(tmp_path, ("params", "projector"), abstract["projector"])
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params["projector"])),
                    jax.tree.leaves(jax.device_get(proj))):
        np.testing.assert_array_equal(a, b)
    wrong = jax.tree.map(lambda a: jax.ShapeDtypeStruct((a.shape[0] + 1,) + a.shape[1:],
                                                        a.dtype, sharding=a.sharding),
                         abstract["projector"])
    with pytest.raises(ValueError, match="not compatible with the stored shape"):
        restore_subtree(tmp_path, ("params", "projector"), wrong)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        restore_subtree(tmp_path / "empty", ("params", "projector"), abstract["projector"])


def _small_state():
    return {"w": jnp.arange(8.0), "step": jnp.zeros((), jnp.int32)}


def test_keep_last_and_keep_every(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_interval=2, keep_last=1, keep_every=4,
                                                   async_save=True))
    for step in range(1, 11):
        ckpt.save(step, _small_state())
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [4, 8, 10]  # every 4th kept, plus the last
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 8, 10]
    ckpt.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_interval=1, keep_last=3,
                                                   async_save=False))
    ckpt.save(1, _small_state())
    ckpt.save(2, {"w": jnp.arange(8.0) + 2, "step": jnp.ones((), jnp.int32)})
    ckpt.close()
    # a save killed midway leaves Orbax's temporary directory (never renamed to "3")
    junk = tmp_path / "3.orbax-checkpoint-tmp-1795000000"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "partial").write_bytes(b"\0" * 10)
    again = Checkpointer(tmp_path, CheckpointConfig(save_interval=1, async_save=False))
    assert again.latest_step() == 2
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            _small_state())
    restored = again.restore(2, abstract)
    np.testing.assert_array_equal(restored["w"], np.arange(8.0) + 2)
    again.close()
