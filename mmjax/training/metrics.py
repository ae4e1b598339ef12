"""Where training metrics go: metrics.jsonl, TensorBoard event files, optionally Weights &
Biases, and a console line with rate and ETA. Only process 0 writes.

    writer = MetricWriter(workdir, MetricsConfig(tensorboard=True), config=c.to_dict())
    writer.write(step, {"loss": ..., "mfu": ...})
    writer.close()
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax

from mmjax.errors import ConfigError

log = logging.getLogger("mmjax.train")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Where metrics go besides WORKDIR/metrics.jsonl and the console."""

    tensorboard: bool = True  # event files in WORKDIR/tensorboard
    wandb_project: str = ""  # set a project to log to Weights & Biases
    wandb_name: str = ""  # the W&B run name (default: the work dir's name)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: known accelerators from a table


class MetricWriter:
    def __init__(self, workdir: Path, cfg: MetricsConfig, config: dict | None = None,
                 purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard drops events from it on (the
        steps replayed after the checkpoint appear once)."""
        self.active = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._jsonl = self._tb = self._wandb = None
        if not self.active:
            return
        self._jsonl = open(self.workdir / "metrics.jsonl", "a")
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter  # start-up cost (1.4 s) when it is off

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=30,
                                     purge_step=purge_step)
        if cfg.wandb_project:
            self._wandb = _start_wandb(self.workdir, cfg.wandb_project, cfg.wandb_name, config)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def examples(self, step: int, tag: str, examples: list[dict]) -> None:
        """Example predictions ({question, answer, reference, image: uint8 [Y, X, C] or
        None}): a TensorBoard text table and images, a W&B table, a metrics.jsonl line."""
        if not self.active or not examples:
            return
        rows = [{k: e[k] for k in ("question", "answer", "reference")} for e in examples]
        self._jsonl.write(json.dumps({"step": step, tag: rows}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            cell = lambda t: str(t).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            table = ["| question | answer | reference |", "|---|---|---|"] + [
                f"| {cell(r['question'])} | {cell(r['answer'])} | {cell(r['reference'])} |"
                for r in rows]
            self._tb.add_text(f"{tag}/examples", "\n".join(table), step)
            for k, e in enumerate(examples):
                if e.get("image") is not None:
                    self._tb.add_image(f"{tag}/example_{k}", e["image"], step,
                                       dataformats="HWC")
        if self._wandb is not None:
            import wandb  # optional extra

            self._wandb.log({f"{tag}/examples": wandb.Table(
                columns=["image", "question", "answer", "reference"],
                data=[[wandb.Image(e["image"]) if e.get("image") is not None else None,
                       e["question"], e["answer"], e["reference"]] for e in examples])},
                step=step)

    def flush(self) -> None:
        """Everything written so far to disk (before a checkpoint is saved: a run killed
        after the checkpoint resumes there and must find the steps up to it logged)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(workdir: Path, project: str, name: str, config: dict | None):
    try:
        import wandb  # optional extra
    except ImportError as e:
        raise ConfigError("metrics.wandb_project is set but wandb is not installed: "
                          "pip install wandb (or leave metrics.wandb_project empty)") from e
    # one W&B run per work dir: a resumed run continues the same W&B run
    id_file = workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        log.info("W&B: no WANDB_API_KEY in the environment; wandb uses its own login")
    return wandb.init(project=project, name=name or workdir.name, id=run_id, resume="allow",
                      dir=str(workdir), config=config)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
