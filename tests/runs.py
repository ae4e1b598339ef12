"""Training runs for tests: what `python -m mmjax.train` runs, in process (`train`) or as the
command (`cmd`, `env`), on the demo config and the `demo_data` fixture (`overrides`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mmjax.evaluation import during_training
from mmjax.training import run
from mmjax.training.config import TrainConfig, from_config

ROOT = Path(__file__).resolve().parent.parent


def train(c, workdir, **kwargs) -> dict:
    tc = c if isinstance(c, TrainConfig) else from_config(c)
    return run.train(tc, Path(workdir), evaluators=during_training.evaluators, **kwargs)


def overrides(data, stage: int, steps: int, extra=()) -> list[str]:
    """--config.* arguments that run `configs/stage{stage}.py:demo` on the demo data."""
    split = "captions" if stage == 1 else "instruct"
    sources = [{"kind": "llava_json", "path": str(data / f"train_{split}.json"),
                "image_root": str(data), "weight": 1.0}]
    return [f"--config.total_steps={steps}", f"--config.tokenizer={data / 'tokenizer'}",
            f"--config.data.sources={sources!r}", "--config.log_every=1",
            "--config.checkpoint.save_interval=2", *extra]


def cmd(workdir, data, steps: int, extra=(), stage: int = 1) -> list[str]:
    """`python -m mmjax.train` of the demo config for `steps` steps in `workdir`."""
    return [sys.executable, "-m", "mmjax.train", "--config",
            f"{ROOT}/configs/stage{stage}.py:demo", "--workdir", str(workdir),
            *overrides(data, stage, steps, list(extra))]


def env(devices: int = 8, **extra) -> dict:
    """The environment of a training subprocess on `devices` fake CPU devices."""
    out = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out.update({k: str(v) for k, v in extra.items()})
    return out
