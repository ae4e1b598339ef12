"""Multi-host start-up: `jax.distributed.initialize` on Cloud TPU VMs, under SLURM / Open MPI,
or with an explicit coordinator; nothing for a single process.

Call `initialize` before anything touches a JAX backend (device lists, arrays, jit).

    mode="auto"      explicit settings if given (config or MMJAX_* environment), else the
                     cluster JAX detects itself: Cloud TPU VM (libtpu installed), SLURM with
                     more than one task, Open MPI with more than one rank; else single process
    mode="explicit"  coordinator_address, num_processes and process_id must be set
    mode="none"      never initialise (one process, e.g. a single GPU host)

Environment equivalents of the explicit fields, for launch scripts:
MMJAX_COORDINATOR_ADDRESS (host:port of process 0), MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from typing import Literal

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start-up (see the module docstring for what each mode does)."""

    mode: Literal["auto", "explicit", "none"] = "auto"  # how processes find each other
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # explicit: how many processes (0: from MMJAX_NUM_PROCESSES)
    process_id: int = -1  # explicit: this process's index (-1: from MMJAX_PROCESS_ID)
    initialization_timeout: int = 300  # seconds to wait for every process to join


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def resolve(cfg: DistributedConfig) -> DistributedConfig:
    """Fills explicit fields left empty from the MMJAX_* environment."""
    return dataclasses.replace(
        cfg,
        coordinator_address=cfg.coordinator_address or os.environ.get(
            "MMJAX_COORDINATOR_ADDRESS", ""),
        num_processes=cfg.num_processes or _int_env("MMJAX_NUM_PROCESSES", 0),
        process_id=cfg.process_id if cfg.process_id >= 0 else _int_env("MMJAX_PROCESS_ID", -1))


def detect_cluster(environ=os.environ) -> str | None:
    """Which multi-process environment this looks like: 'tpu_vm', 'slurm', 'mpi' or None."""
    if int(environ.get("SLURM_NTASKS", environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1 \
            and "SLURM_JOB_ID" in environ:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    if importlib.util.find_spec("libtpu") is not None and "TPU_SKIP_MDS_QUERY" not in environ \
            and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu_vm"  # libtpu and TPU chips: JAX asks the TPU metadata for the slice
    return None


def initialize(cfg: DistributedConfig = DistributedConfig()) -> str:
    """Starts the distributed runtime as configured; returns how ('explicit', 'slurm',
    'tpu_vm', 'mpi' or 'single')."""
    if cfg.mode not in ("auto", "explicit", "none"):
        raise ValueError(f"distributed.mode {cfg.mode!r}: auto, explicit or none")
    if cfg.mode == "none":
        return "single"
    cfg = resolve(cfg)
    explicit = bool(cfg.coordinator_address)
    if cfg.mode == "explicit" or explicit:
        missing = [name for name, ok in (("coordinator_address", explicit),
                                         ("num_processes", cfg.num_processes > 0),
                                         ("process_id", cfg.process_id >= 0)) if not ok]
        if missing:
            raise ValueError(f"explicit multi-process start needs {', '.join(missing)} "
                             "(config distributed.* or MMJAX_COORDINATOR_ADDRESS, "
                             "MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"process_id {cfg.process_id} is not in [0, {cfg.num_processes})")
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                   initialization_timeout=cfg.initialization_timeout)
        how = "explicit"
    else:
        how = detect_cluster()
        if how is None:
            return "single"
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return how
