"""Orbax checkpoints of the train state together with the data iterator.

- Async saves every `save_interval` steps, and at once on a preemption notice.
- Keeps the last `keep_last` checkpoints, plus every `keep_every`-th step if set.
- Only finished checkpoints are listed: a half-written one (killed mid-save) is ignored and
  the previous one is used.
- Restores onto any mesh: the target shardings come with the abstract state.
- `restore_subtree` reads one part of another run's checkpoint (stage 2 taking stage 1's
  projector) and checks that every leaf was really loaded with the expected shape.
- Integrity: every save records two checksums per array (computed on the devices, exact
  integer sums, so any mesh gives the same values) and refuses parameters that are not
  finite; `restore_latest` verifies them and falls back to the newest checkpoint that reads
  and verifies, moving a bad one aside to `corrupt_checkpoints/` (nothing is deleted).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from mmjax.errors import ConfigError
from mmjax.logs import quiet


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and which are kept."""

    save_interval: int = 500  # steps between saves (and at the end, and on preemption)
    keep_last: int = 2  # the newest N checkpoints are kept
    keep_every: int = 0  # also keep every N-th step for good; 0 = off
    async_save: bool = True  # write in the background while training goes on
    strict_restore: bool = False  # stop at a bad checkpoint instead of falling back


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked (the message says which and why)."""


class NonFiniteState(RuntimeError):
    """The state to save holds NaN or Inf parameters."""


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as flat uint32 words."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size in (4, 8):  # 8-byte values become two words each
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def checksums(tree) -> tuple[dict, jax.Array]:
    """Per leaf (by key path) [sum of words, sum of word x (2i + 1)] mod 2^32 over its bits,
    and whether every floating-point leaf is finite. Integer sums are exact in any order."""
    out, finite = {}, jnp.array(True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        w = _words(leaf)
        odd = jax.lax.iota(jnp.uint32, w.size) * jnp.uint32(2) + jnp.uint32(1)
        out[jax.tree_util.keystr(path)] = jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                                                     jnp.sum(w * odd, dtype=jnp.uint32)])
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            finite &= jnp.all(jnp.isfinite(leaf))
    return out, finite


def host_checksums(tree) -> tuple[dict[str, list[int]], bool]:
    """`checksums` fetched to the host as JSON-ready lists, and the finiteness flag."""
    sums, finite = jax.device_get(checksums(tree))
    return {k: [int(x) for x in v] for k, v in sums.items()}, bool(finite)


_TS_ERROR = re.compile(r'Error (reading|writing) "([^"]+)" in OCDBT database at local file '
                       r'"([^"]+)": (?:Failed writing: "([^"]+)": )?([^;\[]*)')


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The root cause of an Orbax / TensorStore error in one line: for a read failure the
    file, the array chunk and what was wrong; without TensorStore's spec dumps."""
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 20:
            break
    for err in chain:
        m = _TS_ERROR.search(str(err))
        if m:
            verb, chunk, database, file, what = m.groups()
            return f"{verb} {file or database} (array chunk {chunk}) failed: {what.strip()}"
    root = chain[-1]
    text = " ".join(str(root).split("See full TensorStore details")[0].split())
    text = text or type(root).__name__
    return f"{type(root).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class _OrbaxErrors(logging.Filter):
    """Drops the error logs of Orbax's background threads and of their asyncio tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "/orbax/" in record.pathname:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + " " + str(getattr(record, "msg", ""))
        return not ("orbax" in text or (exc is not None and "OCDBT" in str(exc)))


def quiet_orbax_errors() -> None:
    """A failed save is logged by Orbax with its traceback from each of its threads, and
    TensorStore's callbacks print more into a closed event loop; `Checkpointer` reports the
    failure once, in one line. For `mmjax.train` (not under --debug)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxErrors())
    previous = sys.excepthook

    def hook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, tb)

    sys.excepthook = hook
    previous_unraisable = sys.unraisablehook

    def unraisable(info):
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == \
                "Event loop is closed":
            return
        previous_unraisable(info)

    sys.unraisablehook = unraisable


@contextlib.contextmanager
def _quiet_failed_reads():
    """A failed Orbax read leaves asyncio futures whose errors are logged, one screenful
    each, when they are collected; the failure is reported once by the caller instead."""
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()
        logger.setLevel(level)


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
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
        self.intact: int | None = None  # newest step known good (verified or saved finite)
        self.meta: dict = {}  # extra facts saved with each checkpoint (e.g. data workers)
        self._saved: int | None = None  # the step of the newest save started

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Saves (when the policy says so, or `force`) with checksums; raises NonFiniteState
        rather than write non-finite parameters, CheckpointError when writing fails."""
        if not force and not self.manager.should_save(step):
            return False
        sums, finite = host_checksums(state)
        if not finite:
            raise NonFiniteState(f"step {step}: the parameters hold NaN or Inf; not saved")
        meta = {**self.meta, "checksums": sums}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.check_for_errors()  # the previous save's failure is reported as its own
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._save_failed(step, e) from e
        if saved:  # the manager finished the previous save before starting this one
            if self._saved is not None:
                self.intact = self._saved
            self._saved = step
        return saved

    def check_for_errors(self) -> None:
        """Raises CheckpointError at once when a background save has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(self._saved, e) from e

    def _save_failed(self, step, e: BaseException) -> CheckpointError:
        reason = _first_line(e)
        failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp/", reason)
        step = int(failed.group(1)) if failed else step  # Orbax reports a previous save's
        kept = (f"the newest intact checkpoint is step {self.intact}" if self.intact is not None
                else "no earlier checkpoint of this run")
        return CheckpointError(f"saving the checkpoint of step {step} in {self.directory} "
                               f"failed ({reason}); {kept}")

    def read_meta(self, step: int) -> dict:
        """The facts saved with `step` (empty for checkpoints written before mmjax saved them)."""
        if not (self.directory / str(step) / "meta").exists():
            return {}
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state, data_iter=None):
        """The state at `step` placed as `abstract_state`'s shardings say; restores the
        data iterator in place when given. Not verified: see `restore_latest`."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(self, abstract_state, data_iter=None, check_meta=None, log=print):
        """(state, step) from the newest checkpoint that reads and matches its checksums, or
        None when there is none. A bad one is reported in one paragraph and moved to
        `../corrupt_checkpoints/STEP`; with `strict_restore` the run stops there instead.
        `check_meta(step, meta)` may raise to refuse a checkpoint (e.g. another worker count).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_failed_reads():
                    meta = self.read_meta(step)
                    if check_meta is not None:
                        check_meta(step, meta)
                    state = self.restore(step, abstract_state, data_iter)
                problem = _verify(state, meta.get("checksums"))
            except ConfigError:
                raise
            except Exception as e:
                problem = _first_line(e)
            if problem is None:
                self.intact = step
                if "checksums" not in meta:
                    log(f"checkpoint step {step} has no recorded checksums (written by an "
                        "older mmjax): restored unverified")
                return state, step
            older = [s for s in self.manager.all_steps() if s < step]
            message = (f"checkpoint step {step} in {self.directory} is not usable: {problem}.")
            if self.cfg.strict_restore:
                raise CheckpointError(message + " Stopping (checkpoint.strict_restore); set "
                                      "it to False to fall back to an older checkpoint.")
            moved = self._quarantine(step)
            log(message + f" Moved to {moved}; "
                + (f"falling back to step {max(older)}." if older else
                   "no older checkpoint; starting from the initial parameters."))
        return None

    def _quarantine(self, step: int) -> Path:
        target = self.directory.parent / "corrupt_checkpoints" / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{step}-{int(time.time())}")
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"mmjax quarantine {step}")
        self.manager.reload()
        return target

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(self._saved, e) from e
        if self._saved is not None:
            self.intact = self._saved

    def close(self) -> None:
        self.manager.close()


def _verify(state, recorded: dict | None) -> str | None:
    """None when `state` matches the checksums recorded at save (or none were recorded)."""
    sums, finite = host_checksums(state)
    if recorded is not None:
        bad = [k for k, v in sums.items() if v != recorded.get(k)]
        if bad:
            return (f"{len(bad)} of {len(sums)} arrays differ from the checksums recorded "
                    f"when it was saved ({', '.join(b.lstrip('.') for b in bad[:3])}"
                    f"{', ...' if len(bad) > 3 else ''}): the files changed on disk")
    if not finite:
        return "its parameters hold NaN or Inf"
    return None


class SubtreeReader:
    """Parts of one checkpoint's state (`state/<path...>`), the checkpoint opened once."""

    def __init__(self, directory: str | Path, step: int | None = None):
        self.directory = Path(directory).absolute()
        with quiet():  # Orbax's notices about opening read-only
            self._manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(read_only=True))
        self.step = self._manager.latest_step() if step is None else step
        if self.step is None:
            self._manager.close()
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")

    def read(self, path: tuple[str, ...], abstract_subtree):
        """`state/<path...>` into `abstract_subtree`'s shapes and shardings; raises naming any
        leaf that is missing or has another shape."""
        target: dict = {}
        node = target
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = abstract_subtree
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), target)
        with quiet():
            out = self._manager.restore(self.step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                             partial_restore=True)))["state"]
        for key in path:
            out = out[key]
        for (p, leaf), (_, want) in zip(
                jax.tree_util.tree_flatten_with_path(out)[0],
                jax.tree_util.tree_flatten_with_path(abstract_subtree)[0]):
            if not isinstance(leaf, jax.Array) or leaf.shape != want.shape:
                raise ValueError(f"{self.directory} step {self.step}: {'/'.join(path)}"
                                 f"{jax.tree_util.keystr(p)} was not loaded with shape "
                                 f"{want.shape}")
        return out

    def close(self) -> None:
        self._manager.close()


def restore_subtree(directory: str | Path, path: tuple[str, ...], abstract_subtree,
                    step: int | None = None):
    """Reads `state/<path...>` of a checkpoint (latest step by default) once (see
    `SubtreeReader.read`)."""
    reader = SubtreeReader(directory, step)
    try:
        return reader.read(path, abstract_subtree)
    finally:
        reader.close()
