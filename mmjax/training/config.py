"""The typed training config: one dataclass per section of a `configs/stage*.py` file.

    tc = from_file("configs/stage2.py:llava_1b", ["--config.data.workers=4"])

`from_config` builds a `TrainConfig` from a loaded ConfigDict once, at the entry point;
library code receives these typed values. A field added to any of these dataclasses is a
config field (settable with `--config.SECTION.FIELD=...`) with nothing else to change:
`configlib.defaults` makes the ConfigDict from them. Fields marked `derived` are filled by
the trainer from other settings. `python -m mmjax.training.config` prints the reference of
every section and field (the README's "Configuration reference").
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import ml_collections

from mmjax import configlib
from mmjax.data.pipeline import DataConfig, SourceConfig, holdout_indices, open_source
from mmjax.distributed import DistributedConfig
from mmjax.errors import ConfigError
from mmjax.models import presets
from mmjax.models.config import LlavaConfig, ProjectorConfig, RuntimeConfig
from mmjax.sharding import batch_axes, batch_ways, make_mesh
from mmjax.training.checkpoint import CheckpointConfig
from mmjax.training.init import InitConfig
from mmjax.training.lora import LoraConfig
from mmjax.training.metrics import MetricsConfig
from mmjax.training.model_spec import ComposeConfig
from mmjax.training.optimizer import OptimConfig

# the benchmarks `python -m mmjax.evaluate` runs (mmjax.evaluation.benchmarks.BENCHMARKS)
BenchmarkName = Literal["vqav2", "gqa", "textvqa", "pope", "scienceqa", "mme", "mmbench",
                        "chartqa", "vizwiz", "short_answer"]


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark to run during training (the arguments of `python -m mmjax.evaluate`)."""

    name: BenchmarkName  # vqav2, gqa, textvqa, pope, scienceqa, mme, mmbench, ..., short_answer
    data: str  # the benchmark's folder as released (MMBench: the TSV; short_answer: the file)
    split: str = ""  # default: the one LLaVA-1.5 reports
    variant: str = ""
    image_root: str = ""
    limit: int = 0  # questions asked; 0: eval.limit
    blank_images: bool = False  # the blind baseline: every image the tower's mean colour
    tag: str = ""  # the metrics' prefix eval/TAG/ (default: the name)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (off unless every_steps is set)."""

    every_steps: int = 0  # evaluate every N steps and after the last; 0 = never
    heldout_batches: int = 8  # batches of data.holdout_share records for val/loss; 0 = all
    benchmarks: tuple[BenchmarkSpec, ...] = ()  # [{name, data, limit, tag, ...}]: BenchmarkSpec
    limit: int = 200  # questions per benchmark unless its own limit says otherwise
    batch_size: int = 32  # generation rows
    max_new_tokens: int = 0  # 0: each benchmark's own
    examples: int = 4  # example predictions per benchmark in TensorBoard / metrics.jsonl

    def due(self, done: int, total: int) -> bool:
        return bool(self.every_steps) and (done % self.every_steps == 0 or done == total)


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

    stage: Literal[1, 2] = 1  # alignment (projector) or instruction tuning (projector + LLM)
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
    compile_cache_dir: str = ""  # compiled programs kept here ("": $MMJAX_CACHE_DIR; "off")
    max_skipped_in_a_row: int = 5  # stop after this many non-finite or empty steps in a row
    mesh: dict[str, int] = dataclasses.field(  # per slice / host; one axis may be -1
        default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    mesh_dcn: dict[str, int] = dataclasses.field(  # across TPU slices or GPU hosts
        default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
    mesh_granule: Literal["auto", "slice", "process"] = "auto"  # what a DCN granule is
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
        n = sum(len(open_source(s, data)) for s in data.sources)
        if data.holdout_share:
            n = len(holdout_indices(n, data.holdout_share)[0])
        return max(1, self.num_epochs * n // self.batch_size)

    def make_mesh(self):
        """The mesh: per-granule axis sizes times the DCN sizes, over all devices."""
        return make_mesh(self.mesh, dcn_sizes=self.mesh_dcn, granule=self.mesh_granule)


def validate(tc: TrainConfig) -> None:
    """Fails at start, naming the fields to set, when a recipe has no weights or data, and
    naming the mistake in any setting that can be checked before anything runs."""
    if tc.model != "auto" and not isinstance(presets.get(tc.model), LlavaConfig):
        llava = [n for n in presets.NAMES if isinstance(presets.get(n), LlavaConfig)]
        raise ConfigError(f"model {tc.model!r} is a tower preset, not a LLaVA model; the LLaVA "
                          f"presets: auto, {', '.join(llava)}")
    _ = ProjectorConfig(tc.llava.projector).depth  # a projector name that does not parse
    missing = []
    towers_from_stage1 = bool(tc.init.stage1_checkpoint) and {
        "vision_tower", "language_model"} <= set(tc.init.stage1_parts)
    if not (tc.init.random or towers_from_stage1 or tc.init.hf_llava
            or (tc.init.hf_vision and tc.init.hf_llm)):
        missing.append("init.hf_llava, or init.hf_vision and init.hf_llm")
    if not tc.data.sources:
        missing.append("data.sources (e.g. [{'kind': 'llava_json', 'path': ..., "
                       "'image_root': ...}])")
    if tc.stage == 2 and not (tc.init.stage1_checkpoint or tc.init.hf_llava or tc.init.random):
        # (init.random alone: stage 2 from an untrained model, the demo's no-stage-1 ablation)
        missing.append("init.stage1_checkpoint (the stage-1 work dir)")
    if not (tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm or tc.init.stage1_checkpoint):
        missing.append("tokenizer")
    if missing:
        raise ConfigError("config is missing: " + "; ".join(missing) + ". Set them with "
                          "--config.FIELD=... (see README 'Training'), or run the embedded "
                          "demo: make demo")
    if not tc.logical_axis_rules:
        raise ConfigError("logical_axis_rules is empty: start from configs/common.py")
    paths = [("tokenizer", tc.tokenizer), ("init.hf_llava", tc.init.hf_llava),
             ("init.hf_vision", tc.init.hf_vision), ("init.hf_llm", tc.init.hf_llm),
             ("init.stage1_checkpoint", tc.init.stage1_checkpoint)]
    for i, src in enumerate(tc.data.sources):
        if src.kind != "tfds":
            paths.append((f"data.sources[{i}].path", src.path))
        if src.image_root:
            paths.append((f"data.sources[{i}].image_root", src.image_root))
    for name, path in paths:
        if path and not Path(path).exists():
            raise ConfigError(f"{name}: {path} does not exist")
    if not 0 <= tc.data.holdout_share < 1:
        raise ConfigError(f"data.holdout_share {tc.data.holdout_share} must be in [0, 1)")
    if tc.eval.every_steps and not (tc.data.holdout_share or tc.eval.benchmarks):
        raise ConfigError("eval.every_steps is set but there is nothing to evaluate: set "
                          "data.holdout_share (validation loss) and/or eval.benchmarks")
    if tc.grad_accum < 0 or tc.batch_size < 1:
        raise ConfigError(f"batch_size {tc.batch_size} must be at least 1 and grad_accum "
                          f"{tc.grad_accum} at least 0 (auto)")


def check_batch_fits_mesh(tc: TrainConfig, mesh) -> None:
    """Each micro-batch's rows split evenly over the mesh axes the batch is sharded on."""
    axes = batch_axes(tc.logical_axis_rules)
    ways = batch_ways(mesh, tc.logical_axis_rules)
    rows = tc.batch_size // tc.grad_accum
    if tc.batch_size % tc.grad_accum or rows % ways:
        split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes) or "none"
        good = ways * tc.grad_accum
        raise ConfigError(
            f"batch_size {tc.batch_size} / grad_accum {tc.grad_accum} does not split into "
            f"micro-batches over the {ways} devices the batch is sharded on (mesh {split}); "
            f"use a multiple of {good}, e.g. --config.batch_size="
            f"{max(good, round(tc.batch_size / good) * good)}")


def from_config(c: ml_collections.ConfigDict) -> TrainConfig:
    """The whole training config, typed and checked (unknown or mistyped fields named)."""
    return configlib.typed(TrainConfig, c)


def from_file(spec: str, overrides: list[str] = ()) -> TrainConfig:
    """`configs/stage2.py[:VARIANT]` with `--config.x=y` overrides, typed and checked."""
    return from_config(configlib.load(spec, overrides))


# --------------------------------------------------------------------------- reference
def reference_markdown() -> str:
    """Every section and field of the training config, with defaults and meanings."""

    def table(cls, prefix: str) -> list[str]:
        docs = configlib.field_docs(cls)
        hints = typing.get_type_hints(cls)
        rows = ["| field | default | meaning |", "| --- | --- | --- |"]
        for f in configlib.settable_fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            value = configlib.field_default(f)
            shown = repr(list(value) if isinstance(value, tuple) else value)
            if len(shown) > 40:
                shown = shown[:37] + "..."
            shown = shown.replace("|", "\\|")
            meaning = docs.get(f.name, "")
            if typing.get_origin(hints[f.name]) is Literal:
                choices = " | ".join(map(str, typing.get_args(hints[f.name])))
                meaning = f"{choices}: {meaning}" if meaning else choices
            meaning = meaning.replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {meaning} |")
        return rows

    out = ["Top level (`--config.FIELD=...`):", ""] + table(TrainConfig, "")
    for f in configlib.settable_fields(TrainConfig):
        section = typing.get_type_hints(TrainConfig)[f.name]
        if dataclasses.is_dataclass(section):
            doc = (section.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out += ["", f"`{f.name}`: {doc}", ""] + table(section, f"{f.name}.")
            derived = [g for g in dataclasses.fields(section) if "derived" in g.metadata]
            if derived:
                out += ["", "Set by `mmjax.train`, not in the config: " + ", ".join(
                    f"`{f.name}.{g.name}` ({g.metadata['derived']})" for g in derived) + "."]
            if section.__name__ == "DataConfig":
                out += ["", "Each entry of `data.sources`:", ""] + table(SourceConfig, "")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
