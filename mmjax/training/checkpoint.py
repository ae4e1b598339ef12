"""Orbax checkpoints of the train state together with the data iterator.

- Async saves every `save_interval` steps, and at once on a preemption notice.
- Keeps the last `keep_last` checkpoints, plus every `keep_every`-th step if set.
- Only finished checkpoints are listed: a half-written one (killed mid-save) is ignored and
  the previous one is used.
- Restores onto any mesh: the target shardings come with the abstract state.
- `restore_subtree` reads one part of another run's checkpoint (stage 2 taking stage 1's
  projector) and checks that every leaf was really loaded with the expected shape.
- Integrity: every item of a checkpoint is checked at restore. The state: two checksums
  per array (computed on the devices, exact integer sums, so any mesh gives the same
  values), and parameters that are not finite are never saved. The data position: the
  sha256 of each process's `data_iter/process_I-of-N.json`. The meta item (those sums, the
  worker count): the sha256 of its own content. The files: their sizes, listed in
  `mmjax_files.json` once the save is complete. `restore_latest` falls back to the newest
  checkpoint that passes all of it, moving a bad one aside to `corrupt_checkpoints/`
  (nothing is deleted), and says in one line which file is missing, truncated, unreadable or
  changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
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


class Damaged(Exception):
    """A checkpoint item is missing or differs from what was saved (the message says which
    file and how)."""


META_SHA = "meta_sha256"  # the meta item's hash of itself (all its other keys)
DATA_SHA = "data_iter_sha256"  # per process: the sha256 of its data_iter file
FILES = "mmjax_files.json"  # {path in the step dir: size}, written once the save is complete
ORBAX_METADATA = "_CHECKPOINT_METADATA"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _meta_sha(meta: dict) -> str:
    return _sha(json.dumps({k: v for k, v in meta.items() if k != META_SHA}, sort_keys=True))


def data_state_text(data_iter) -> str:
    """The data iterator's state as Grain's checkpoint handler writes it."""
    if isinstance(data_iter, grain.DatasetIterator):
        return json.dumps(data_iter.get_state(), indent=4)
    return data_iter.get_state().decode()


def _data_file(step_dir: Path) -> Path:
    return step_dir / "data_iter" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _all_processes(value: str) -> list[str]:
    """Every process's hex digest, in process order (a collective with several)."""
    if jax.process_count() == 1:
        return [value]
    rows = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(value), np.uint8))
    return [bytes(np.asarray(r, np.uint8)).hex() for r in np.asarray(rows)]


def _agree(problem: str | None) -> str | None:
    """The problem one process found, for every process (they fall back together)."""
    if jax.process_count() == 1:
        return problem
    bad = multihost_utils.process_allgather(np.int32(problem is not None))
    if not np.any(np.asarray(bad)):
        return None
    return problem or "another process found it damaged"


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


def host_checksums(tree, compiled=None) -> tuple[dict[str, list[int]], bool]:
    """`checksums` (or its `compiled` program for the tree's shapes) fetched to the host as
    JSON-ready lists, and the finiteness flag."""
    try:
        out = compiled(tree) if compiled is not None else checksums(tree)
    except (TypeError, ValueError):  # another layout than the one compiled for
        out = checksums(tree)
    sums, finite = jax.device_get(out)
    return {k: [int(x) for x in v] for k, v in sums.items()}, bool(finite)


_TS_KEY = re.compile(r'Error (reading|writing|opening) .*?"([^"]+)" in OCDBT database at '
                     r'local file "([^"]+)"(?:: (?:Failed writing: "([^"]+)": )?(.*))?')
_BYTE_RANGE = re.compile(r"Requested byte range \[(\d+), (\d+)\) is not valid for value of "
                         r"size (\d+)")
_MISSING_ITEM = re.compile(r'Item "([^"]+)" was not found in the checkpoint')


def _first_line(e: BaseException, step_dir: Path | None = None, limit: int = 300) -> str:
    """What went wrong with a checkpoint, in one line a user acts on: which file or array
    chunk, and whether it is missing, truncated or unreadable; never TensorStore's spec
    dumps."""
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 20:
            break
    for err in chain:
        if isinstance(err, Damaged):
            return str(err)
    for err in chain:
        text = " ".join(str(err).split(" [tensorstore_spec")[0].split())
        m = _TS_KEY.search(text)
        if m:
            return _tensorstore_problem(text, *m.groups())
        m = _MISSING_ITEM.search(text)
        if m and step_dir is not None:
            return f"{step_dir / m.group(1)} is missing"
    root = chain[-1]
    text = " ".join(str(root).split("See full TensorStore details")[0].split())
    text = text or type(root).__name__
    return f"{type(root).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _tensorstore_problem(text: str, verb: str, key: str, database: str, file: str | None,
                         what: str | None) -> str:
    """A TensorStore error about one key of an OCDBT database (a checkpoint's `state/`) in
    words: the array chunk, the file, and what is wrong with it."""
    where = Path(database)
    what = (what or "").strip().rstrip(".")
    if verb == "writing":
        return f"writing {file or database} (array chunk {key}) failed: {what}"
    m = _BYTE_RANGE.search(text)
    if m:
        return (f"array chunk {key} in {where} is truncated (its data ends at byte "
                f"{m.group(3)}, {m.group(2)} bytes were written)")
    if re.search(r"ZSTD|decompress|frame descriptor|corrupt|checksum mismatch", text, re.I):
        return f"array chunk {key} in {where} is unreadable (its data does not decompress)"
    if "does not exist" in text or "NOT_FOUND" in text:
        manifest = where / "manifest.ocdbt"
        if not manifest.exists():
            return f"{manifest} is missing"
        return f"array {key.rsplit('/', 1)[0]} in {where} is missing"
    return f"{verb} array chunk {key} in {where} failed: {what[:200] or 'unknown error'}"


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


# Orbax splits an array that several devices hold copies of into one slice per copy, so the
# copies share the writing; each distinct slice is an eager op compiled on first use (about
# 5 s on the first save of the demo's 162 small arrays). Only arrays whose slices are at
# least this large are split: the big ones, where sharing the writes pays.
REPLICA_PARALLEL_MIN_BYTES = 16 << 20


def _register_array_handler() -> None:
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(handler, "_min_slice_bytes_for_replica_parallel", None) == \
            REPLICA_PARALLEL_MIN_BYTES:
        return
    with quiet():  # Orbax warns that it replaces its default
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
            override=True)


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
        _register_array_handler()
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
        with quiet():  # Orbax warns about a step whose _CHECKPOINT_METADATA is gone
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.intact: int | None = None  # newest step known good (verified or saved finite)
        self.meta: dict = {}  # extra facts saved with each checkpoint (e.g. data workers)
        self._saved: int | None = None  # the step of the newest save started
        self._checksums = None  # `checksums` compiled ahead for the state's shapes
        self._compiling: threading.Thread | None = None

    def prepare(self, abstract_state) -> None:
        """Compiles the checksum program for the state's shapes and shardings in the
        background, so the first save does not wait for it."""
        def compile_():
            try:
                self._checksums = checksums.lower(abstract_state).compile()
            except Exception:  # the save compiles it then, and reports what fails
                self._checksums = None

        # not a daemon: a run that ends early waits for it (XLA aborts the process when the
        # interpreter exits under a compile)
        self._compiling = threading.Thread(target=compile_, name="mmjax-checksums")
        self._compiling.start()

    def latest_step(self) -> int | None:
        with quiet():
            return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Saves (when the policy says so, or `force`) with checksums; raises NonFiniteState
        rather than write non-finite parameters, CheckpointError when writing fails."""
        if not force and not self.manager.should_save(step):
            return False
        if self._compiling is not None:
            self._compiling.join()
            self._compiling = None
        sums, finite = host_checksums(state, self._checksums)
        if not finite:
            raise NonFiniteState(f"step {step}: the parameters hold NaN or Inf; not saved")
        meta = {**self.meta, "checksums": sums}
        if data_iter is not None:  # the text Grain's handler writes next (synchronously)
            meta[DATA_SHA] = _all_processes(_sha(data_state_text(data_iter)))
        meta[META_SHA] = _meta_sha(meta)
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
                self._complete(self._saved)
            self._saved = step
            if not self.cfg.async_save:
                self._complete(step)
        return saved

    def _complete(self, step: int) -> None:
        """`step` is written: it is the newest intact one; its file sizes are recorded."""
        self.intact = step
        step_dir = self.directory / str(step)
        if jax.process_index() != 0 or not step_dir.is_dir() or (step_dir / FILES).exists():
            return
        sizes = {str(p.relative_to(step_dir)): p.stat().st_size
                 for p in sorted(step_dir.rglob("*")) if p.is_file()}
        tmp = step_dir / (FILES + ".tmp")
        tmp.write_text(json.dumps(sizes, indent=0))
        os.replace(tmp, step_dir / FILES)

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
        """The facts saved with `step`, checked against their own hash (Damaged when they
        differ or the item is missing; empty for checkpoints written before mmjax saved
        them)."""
        step_dir = self.directory / str(step)
        path = step_dir / "meta" / "metadata"
        if not (step_dir / "meta").exists():
            if _orbax_items(step_dir) & {"meta"} or (step_dir / FILES).exists():
                raise Damaged(f"{step_dir / 'meta'} is missing")
            return {}
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise Damaged(f"{path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Damaged(f"{path} is unreadable (not JSON)") from None
        if not isinstance(meta, dict):
            raise Damaged(f"{path} is unreadable (not a JSON object)")
        if META_SHA in meta and meta[META_SHA] != _meta_sha(meta):
            raise Damaged(f"{path} changed after it was written (its content does not match "
                          "its sha256)")
        return meta

    def check_items(self, step: int, meta: dict, data_iter) -> str | None:
        """Before reading `step`: its files all there at their written sizes, and this
        process's data position the one saved. None, or what is wrong (every process gets
        the same answer)."""
        step_dir = self.directory / str(step)
        problem = _check_sizes(step_dir)
        if problem is None and data_iter is not None and DATA_SHA in meta:
            path = _data_file(step_dir)
            recorded = meta[DATA_SHA]
            if not path.is_file():
                problem = f"{path} is missing"
            elif (jax.process_index() >= len(recorded)
                  or _sha(path.read_text(errors="replace")) != recorded[jax.process_index()]):
                problem = f"{path} (the data position) changed after it was written"
        return _agree(problem)

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
        with quiet():
            steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            step_dir = self.directory / str(step)
            try:
                with _quiet_failed_reads():
                    meta = self.read_meta(step)
                    problem = self.check_items(step, meta, data_iter)
                    if problem is None:
                        if check_meta is not None:
                            check_meta(step, meta)
                        if not (step_dir / ORBAX_METADATA).exists():
                            log(f"checkpoint step {step}: {step_dir / ORBAX_METADATA} (Orbax's "
                                "list of the items) is missing; reading the items mmjax "
                                "saves, verified")
                        with quiet():  # Orbax's warning about that file
                            state = self.restore(step, abstract_state, data_iter)
                        problem = _verify(state, meta.get("checksums"))
            except ConfigError:
                raise
            except Exception as e:
                problem = _first_line(e, step_dir)
            if problem is None:
                self.intact = step
                if "checksums" not in meta:
                    log(f"checkpoint step {step} has no recorded checksums (written by an "
                        "older mmjax): restored unverified")
                return state, step
            older = [s for s in steps if s < step]
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
            self._complete(self._saved)

    def close(self) -> None:
        if self._compiling is not None:
            self._compiling.join()
        self.manager.close()


def _orbax_items(step_dir: Path) -> set[str]:
    """The items Orbax recorded for a step (empty when its metadata file is gone)."""
    try:
        return set(json.loads((step_dir / ORBAX_METADATA).read_text()).get("item_handlers")
                   or {})
    except (OSError, ValueError, AttributeError):
        return set()


def _check_sizes(step_dir: Path) -> str | None:
    """None when every file listed at save is there at its size (or nothing was listed)."""
    try:
        sizes = json.loads((step_dir / FILES).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{step_dir / FILES} is unreadable (not JSON)"
    problems, gone = [], set()
    for rel, size in sizes.items():
        path = step_dir / rel
        item = step_dir / Path(rel).parts[0]
        if not item.exists():  # a whole item (state, meta, data_iter) is gone: said once
            if item not in gone:
                gone.add(item)
                problems.append(f"{item} is missing")
        elif not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size < size:
            problems.append(f"{path} is truncated ({path.stat().st_size} of {size} bytes)")
        elif path.stat().st_size > size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} when written")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


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
