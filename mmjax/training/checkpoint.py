"""Orbax checkpoints of the train state together with the data iterator.

- Async saves every `save_interval` steps, and at once on a preemption notice.
- Keeps the last `keep_last` checkpoints, plus every `keep_every`-th step if set.
- Only finished checkpoints are listed: a half-written one (killed mid-save) is ignored and
  the previous one is used.
- Restores onto any mesh: the target shardings come with the abstract state.
- `restore_subtree` reads one part of another run's checkpoint (stage 2 taking stage 1's
  projector) and checks that every leaf was really loaded with the expected shape.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    save_interval: int = 500  # steps between saves (and at the end, and on preemption)
    keep_last: int = 2  # the newest N checkpoints are kept
    keep_every: int = 0  # also keep every N-th step for good; 0 = off
    async_save: bool = True  # write in the background while training goes on


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        keep = [policies.LatestN(cfg.keep_last)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(cfg.save_interval),
                policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iter=None):
        """The state at `step` placed as `abstract_state`'s shardings say; restores the
        data iterator in place when given."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_subtree(directory: str | Path, path: tuple[str, ...], abstract_subtree,
                    step: int | None = None):
    """Reads `state/<path...>` of a checkpoint (latest step by default) into
    `abstract_subtree`'s shapes and shardings; raises naming any leaf that is missing or
    has another shape."""
    directory = Path(directory).absolute()
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    target: dict = {}
    node = target
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = abstract_subtree
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))["state"]
    manager.close()
    out = restored
    for key in path:
        out = out[key]
    for (p, leaf), (_, want) in zip(jax.tree_util.tree_flatten_with_path(out)[0],
                                    jax.tree_util.tree_flatten_with_path(abstract_subtree)[0]):
        if not isinstance(leaf, jax.Array) or leaf.shape != want.shape:
            raise ValueError(f"{directory} step {step}: {'/'.join(path)}"
                             f"{jax.tree_util.keystr(p)} was not loaded with shape {want.shape}")
    return out
