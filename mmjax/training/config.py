"""The typed training config: one dataclass per section of a `configs/stage*.py` file.

`mmjax.configlib.train_config` builds a `TrainConfig` from the loaded ConfigDict once, at the
entry point; library code receives these typed values. A field added to any of these
dataclasses is a config field (settable with `--config.SECTION.FIELD=...`) with nothing else
to change: `configlib.defaults` makes the ConfigDict from them. Fields marked `derived` are
filled by `mmjax.train` from other settings.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mmjax.data.pipeline import DataConfig
from mmjax.distributed import DistributedConfig
from mmjax.models.config import ConfigError, RuntimeConfig
from mmjax.training.checkpoint import CheckpointConfig
from mmjax.training.evaluate import EvalConfig
from mmjax.training.init import InitConfig
from mmjax.training.lora import LoraConfig
from mmjax.training.metrics import MetricsConfig
from mmjax.training.optimizer import OptimConfig
from mmjax.training.recipe import ComposeConfig


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A `jax.profiler` trace over a window of steps, into WORKDIR/profile."""

    start_step: int = 0  # first step traced
    num_steps: int = 0  # steps traced; 0 = off


def _section(cls):
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training stage: the model, where weights and data come from, how it runs."""

    stage: int = 1  # 1: alignment (projector); 2: instruction tuning (projector + LLM)
    model: str = "auto"  # auto: from the HF configs of init.*; or a preset (models.presets)
    tokenizer: str = ""  # tokenizer dir; default: stage 1's, init.hf_llava's or init.hf_llm's
    seed: int = 0  # data order, random init and dropout
    batch_size: int = 128  # global rows per step, across processes and accumulation
    grad_accum: int = 1  # micro-batches per step (rows split across them); 0 = auto
    max_rows_per_device: int = 8  # grad_accum=0: micro-batches of at most this many rows per device
    num_epochs: int = 1  # passes over the data, when total_steps is 0
    total_steps: int = 0  # optimizer steps; 0 = num_epochs over the data
    log_every: int = 10  # steps between metric records and console lines
    log_sample_ids: bool = False  # write each step's sample ids to samples.jsonl (debugging)
    max_skipped_in_a_row: int = 5  # stop after this many non-finite or empty steps in a row
    mesh: dict[str, int] = dataclasses.field(  # per slice / host; one axis may be -1
        default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    mesh_dcn: dict[str, int] = dataclasses.field(  # across TPU slices or GPU hosts
        default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
    mesh_granule: str = "auto"  # auto | slice | process: what a DCN granule is
    logical_axis_rules: tuple[tuple[str, Any], ...] = ()  # logical axis -> mesh axes
    runtime: RuntimeConfig = _section(RuntimeConfig)
    data: DataConfig = _section(DataConfig)
    optim: OptimConfig = _section(OptimConfig)
    lora: LoraConfig = _section(LoraConfig)
    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    eval: EvalConfig = _section(EvalConfig)
    profile: ProfileConfig = _section(ProfileConfig)
    init: InitConfig = _section(InitConfig)
    llava: ComposeConfig = _section(ComposeConfig)
    distributed: DistributedConfig = _section(DistributedConfig)

    def for_mesh(self, mesh) -> "TrainConfig":
        """This config with grad_accum=0 (auto) made concrete for a mesh: the fewest
        micro-batches whose rows split evenly over the batch's devices, at most
        `max_rows_per_device` rows on each."""
        if self.grad_accum:
            return self
        from mmjax.sharding import batch_ways

        ways = batch_ways(mesh, self.logical_axis_rules)
        for a in range(1, self.batch_size + 1):
            rows = self.batch_size // a
            if self.batch_size % a == 0 and rows % ways == 0 and \
                    rows // ways <= max(1, self.max_rows_per_device):
                return dataclasses.replace(self, grad_accum=a)
        good = max(ways, round(self.batch_size / ways) * ways)
        raise ConfigError(f"batch_size {self.batch_size} does not split into micro-batches "
                          f"over the {ways} devices the batch is sharded on (grad_accum 0: "
                          f"auto); use a multiple of {ways}, e.g. --config.batch_size={good}")

    @property
    def model_runtime(self) -> RuntimeConfig:
        """The runtime with the LoRA section's adapters."""
        return self.lora.runtime(self.runtime)

    @property
    def optimizer_groups(self) -> tuple[tuple[str, float | None], ...]:
        return self.lora.groups() if self.lora.enabled else self.optim.groups

    def data_config(self, process_count: int) -> DataConfig:
        """The data section with what the trainer derives: rows per process, seed, repeats."""
        if self.batch_size % (process_count * max(1, self.grad_accum)):
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by processes "
                              f"({process_count}) x grad_accum ({self.grad_accum})")
        return dataclasses.replace(self.data, batch_size=self.batch_size // process_count,
                                   seed=self.seed, num_epochs=None)

    def steps(self, data: DataConfig) -> int:
        """total_steps, or num_epochs over the data's samples."""
        if self.total_steps:
            return self.total_steps
        from mmjax.data.pipeline import open_source

        n = sum(len(open_source(s, data)) for s in data.sources)
        if data.holdout_share:
            from mmjax.data.pipeline import holdout_indices

            n = len(holdout_indices(n, data.holdout_share)[0])
        return max(1, self.num_epochs * n // self.batch_size)
