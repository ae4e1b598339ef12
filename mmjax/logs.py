"""Console noise from the libraries under us, silenced in one place.

Orbax logs notices through absl at INFO / WARNING that mean nothing to a user of a command
(a checkpoint opened read-only, a missing `_CHECKPOINT_METADATA` it recreates); `quiet` lowers
a logger for a block, `quiet_notices` for the rest of a command.
"""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet(name: str = "absl", level: int = logging.ERROR):
    """Within the block, logger `name` shows only records at `level` and above."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def quiet_notices() -> None:
    """For a command's whole run: absl (Orbax's notices) at ERROR only."""
    logging.getLogger("absl").setLevel(logging.ERROR)
