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


# ---------------------------------------------------------------- damaged checkpoints

def _write_two_steps(directory):
    """Steps 1 and 2 of a state and a Grain iterator (5 records read before each)."""
    import grain

    ckpt = Checkpointer(directory, CheckpointConfig(save_interval=1, keep_last=3,
                                                    async_save=False))
    ckpt.meta = {"data_workers": 0}
    it = iter(grain.MapDataset.range(1000).to_iter_dataset())
    state = {"w": jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256),
             "b": jnp.ones((300,), jnp.float32), "n": jnp.int32(3)}
    for step in (1, 2):
        for _ in range(5):
            next(it)
        ckpt.save(step, state, it, force=True)
    ckpt.close()
    return state


def _restore_latest(directory, state):
    """Checkpointer.restore_latest over `directory` for `state`'s shapes and shardings, with
    a fresh Grain iterator: (restored, step, the iterator, the lines it said)."""
    import grain

    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    it = iter(grain.MapDataset.range(1000).to_iter_dataset())
    said = []
    restored, step = ckpt.restore_latest(abstract, it, log=said.append)
    ckpt.close()
    return restored, step, it, said


def _chunk_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()
                and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def _replace(path, old: str, new: str):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


DAMAGE = {  # how, and what the one line says (a regex), with the file list / without it
    "chunk truncated": (
        lambda d: _chunk_file(d).write_bytes(_chunk_file(d).read_bytes()[:5000]),
        r"state/.*/d/\w+ is truncated \(5000 of \d+ bytes\)",
        r"array chunk w/0\.0 in .*/2/state is truncated \(its data ends at byte \d+, \d+ "
        r"bytes were written\)"),
    "chunk zeroed": (
        lambda d: _chunk_file(d).write_bytes(bytes(_chunk_file(d).stat().st_size)),
        r"array chunk w/0\.0 in .*/2/state is unreadable \(its data does not decompress\)",
        None),
    "manifest deleted": (
        lambda d: (d / "state" / "manifest.ocdbt").unlink(),
        r"/2/state/manifest\.ocdbt is missing", None),
    "data position changed": (
        lambda d: _replace(d / "data_iter" / "process_0-of-1.json", '"next_index": 10',
                           '"next_index": 11'),
        r"/2/data_iter/process_0-of-1\.json \(the data position\) changed after it was "
        r"written", None),
    "data position deleted": (
        lambda d: __import__("shutil").rmtree(d / "data_iter"),
        r"/2/data_iter is missing", r"/2/data_iter/process_0-of-1\.json is missing"),
    "meta changed": (
        lambda d: _replace(d / "meta" / "metadata", '"data_workers": 0', '"data_workers": 1'),
        r"/2/meta/metadata changed after it was written", None),
    "meta deleted": (
        lambda d: __import__("shutil").rmtree(d / "meta"), r"/2/meta is missing", None),
}


@pytest.mark.parametrize("listed", [True, False], ids=["sizes-listed", "no-list"])
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_each_damage_is_named_in_one_line_and_the_older_step_restored(name, listed, tmp_path,
                                                                     capfd):
    """Every item checked (the arrays, the data position, meta, the files' sizes): the
    damaged newest step is moved aside with one line naming the file and what is wrong
    (with the list of sizes the save wrote, or without it: a checkpoint whose process died
    before writing it), and step 1 comes back with its own data position."""
    import re

    state = _write_two_steps(tmp_path / "c")
    step_dir = tmp_path / "c" / "2"
    if not listed:
        (step_dir / "mmjax_files.json").unlink()
    how, said, said_unlisted = DAMAGE[name]
    how(step_dir)
    restored, step, it, said_lines = _restore_latest(tmp_path / "c", state)
    assert step == 1 and next(it) == 5  # step 1's data position
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert len(said_lines) == 1 and "\n" not in said_lines[0]
    assert re.search(said if listed else (said_unlisted or said), said_lines[0]), said_lines[0]
    assert "falling back to step 1" in said_lines[0]
    assert not re.search(r"tensorstore|driver|spec|Error opening", said_lines[0], re.I)
    assert (tmp_path / "corrupt_checkpoints" / "2").is_dir()
    assert "WARNING" not in capfd.readouterr().err


def test_a_missing_orbax_metadata_file_is_said_and_the_step_still_verified(tmp_path, capfd):
    """Orbax's own item list gone from a step without mmjax's list of sizes: read with the
    items mmjax saves, every checksum verified, one line instead of an absl warning."""
    state = _write_two_steps(tmp_path / "c")
    (tmp_path / "c" / "2" / "mmjax_files.json").unlink()
    (tmp_path / "c" / "2" / "_CHECKPOINT_METADATA").unlink()
    _, step, it, said = _restore_latest(tmp_path / "c", state)
    assert step == 2 and next(it) == 10
    assert len(said) == 1 and "_CHECKPOINT_METADATA (Orbax's list of the items) is missing" \
        in said[0]
    assert "WARNING" not in capfd.readouterr().err
