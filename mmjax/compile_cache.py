"""JAX's persistent compilation cache for the commands: a program compiled once is read back
from disk by every later process (a second `python -m mmjax.generate`, a restarted
`mmjax.train` after a preemption) instead of being compiled again.

Where: `$MMJAX_CACHE_DIR/jax` (default `~/.cache/mmjax/jax`); training takes
`compile_cache_dir` from its config first (a bucket path such as gs://... works too, so every
host of a pod and every restart share one). `off` turns it off; `JAX_COMPILATION_CACHE_DIR`,
when set, is JAX's own setting and wins.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

OFF = ("off", "none", "0", "false")
MIN_COMPILE_SECONDS = 0.5  # programs that compile faster than this are not written


def directory(configured: str = "") -> str | None:
    """The cache directory to use (None: off)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    value = configured or os.environ.get("MMJAX_CACHE_DIR", "")
    if value.lower() in OFF:
        return None
    if not value:
        value = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmjax")
    return value.rstrip("/") + "/jax"


def enable(configured: str = "") -> str | None:
    """Turns the persistent cache on for this process (before its first compile); returns
    the directory, or None when it is off."""
    where = directory(configured)
    if where is None:
        return None
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        if "://" not in where:
            Path(where).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return where
