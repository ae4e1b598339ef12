"""Two-stage LLaVA training.

    python -m mmjax.train --config configs/stage2.py[:VARIANT] --workdir DIR [--config.x=y ...]

Resume order: a checkpoint in DIR (the newest one that reads and matches the checksums
recorded when it was saved, data iterator included), else fresh parameters (stage-1
checkpoint parts, HF weights, random; see mmjax.training.init). One run per work dir (a
lock); a resume with another config is refused unless --allow-config-change.
Exit status: 0 done, 75 preempted (checkpoint saved; rerun the same command), 2 a mistake in
the config or input (one line says which and the fix; --debug shows the traceback), 1 the
run stopped (non-finite steps, bad data, a failed save), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mmjax import compile_cache, distributed
from mmjax.data.quality import BadShareExceeded, DataStalled
from mmjax.data.sources import DataSourceError
from mmjax.errors import ConfigError
from mmjax.evaluation import during_training
from mmjax.training import loop, run
from mmjax.training.checkpoint import CheckpointError, quiet_orbax_errors
from mmjax.training.config import from_file, validate
from mmjax.training.workdir import WorkdirLocked

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on a preemption notice; rerun to resume

# Mistakes in the config or the input: one line (and the fix), exit 2.
USER_ERRORS = (ConfigError, DataSourceError, WorkdirLocked)
# The run stopped for a reason it states: one line, exit 1.
RUN_STOPS = (loop.NonFiniteStop, DataStalled, BadShareExceeded, CheckpointError)


def main(argv=None) -> int:
    """Parses the command line, trains, and returns the exit status (above)."""
    parser = argparse.ArgumentParser(prog="python -m mmjax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/stage1.py[:VARIANT]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the config differs from the saved one")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of the errors that are otherwise one line")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.debug:
        quiet_orbax_errors()
    try:
        tc = from_file(args.config, overrides)
        compile_cache.enable(tc.compile_cache_dir)
        validate(tc)
        during_training.check(tc.eval)
        distributed.initialize(tc.distributed)
        history = run.train(tc, Path(args.workdir), allow_config_change=args.allow_config_change,
                            evaluators=during_training.evaluators)
    except USER_ERRORS + RUN_STOPS as e:
        if args.debug:
            raise
        status = 2 if isinstance(e, USER_ERRORS) else 1
        if isinstance(e, CheckpointError):
            _exit_now(f"error: {e}", status)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return status
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted (the newest checkpoint in the work dir resumes the run)",
              file=sys.stderr, flush=True)
        return 130
    return PREEMPTED_EXIT if history.get("preempted") else 0


def _exit_now(message: str, status: int):
    """Prints the one line and exits at once: after a failed save, Orbax's background writer
    threads may still hang on the files, or print tracebacks into a closed event loop at
    interpreter shutdown."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
