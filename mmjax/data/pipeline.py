"""The Grain pipeline: sources -> mixture -> shuffle -> per-process shard -> [in workers:
process samples -> drop bad ones -> pad or pack into batches] -> add up skip counts.

    it = build_pipeline(DataConfig(...), tokenizer, model_cfg)
    batch = next(it)                      # numpy, this process's rows (format: mmjax.batch)
    arrays = mmjax.batch.global_batch(batch, mesh, rules)   # sharded jax.Arrays
    it.get_state() / it.set_state(...)    # or grain.checkpoint.CheckpointSave(it) with Orbax
    skip_report(it)                       # skipped samples by reason, for logs and metrics
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
from typing import Literal, Sequence

import grain
import jax
import numpy as np

from mmjax.data.batching import BatchDataset, BatchSpec, ReportDataset, SkipFilterDataset
from mmjax.data.image import ImageAspect
from mmjax.data.processing import ImageSpec, SampleProcessor
from mmjax.data.quality import SkipReport
from mmjax.data.sources import ArrayRecordSource, LlavaJsonSource, TfdsCaptionSource
from mmjax.data.templates import TemplateName, default_template, get_template
from mmjax.data.tokenize import ConversationEncoder
from mmjax.errors import ConfigError
from mmjax.models.config import LlavaConfig


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One data source of a mixture (an entry of `data.sources`)."""

    kind: Literal["llava_json", "arrayrecord", "tfds"]  # the source's format
    path: str = ""  # JSON/JSONL file, ArrayRecord glob, or TFDS dataset name
    image_root: str = ""  # llava_json: directory the records' image paths are under
    weight: float = 1.0  # mixture weight
    split: str = "train"  # tfds: the split to read
    name: str = ""  # a name for logs and skip reports (default: from the path)


def _set_by_trainer(default, how: str):
    """A field `mmjax.train` derives from other settings (not in the config's `data`)."""
    return dataclasses.field(default=default, metadata={"derived": how})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline: sources, template, lengths, packing, workers, bad-data limits."""

    sources: tuple[SourceConfig, ...] = ()  # [{kind, path, image_root, weight, split, name}]
    template: TemplateName = "vicuna_v1"  # auto: the LLM family's (templates.default_template)
    special_token_text: Literal["skip", "keep"] = "skip"  # text that would be a control token
    max_length: int = 2048  # tokens per sample, image tokens included
    seq_len: int = 0  # row length; 0 = max_length (longer rows pack more samples)
    packing: Literal["pad", "first_fit", "best_fit"] = "pad"  # several samples per row
    pack_window: int = 0  # samples per packing window (0: 32 batches' worth)
    group_by_length: bool = False  # pad mode: batch samples of similar length together
    length_buckets: tuple[int, ...] = ()  # pad mode: batch row lengths (a few static shapes)
    max_images_per_row: int = 0  # image slots per row; 0 = 1 (pad), else what a row holds, <= 4
    # anyres: LLaVA-NeXT's views on the model's image_grid_pinpoints (NeXT models only)
    image_aspect: ImageAspect = "pad"  # to the tower's square (pad: LLaVA-1.5's), or anyres
    max_image_pixels: int = 64_000_000  # decompression-bomb limit
    video_frames: int = 32  # OneVision videos: at most this many frames, spread evenly
    video_fps: float = 1.0  # OneVision videos: frames per second kept before that cap
    normalize_on_host: bool = False  # ship float32 instead of uint8 (measured slower)
    shuffle: bool = True  # shuffle the mixture (seeded by `seed`)
    holdout_share: float = 0.0  # records (of the mixture) kept out of training: the held-out
    # split eval.every_steps computes the validation loss on
    workers: int = 0  # Grain worker processes (0: in the main process)
    worker_buffer: int = 2  # batches buffered per worker
    max_bad_share: float = 0.05  # abort when more of the samples read were skipped
    min_samples_before_abort: int = 200  # samples read before the share is checked
    max_bad_in_a_row: int = 2000  # stop when this many samples in a row were skipped; 0 = off
    tfds_data_dir: str | None = None  # TFDS data_dir of locally prepared datasets
    index_cache_dir: str | None = None  # LLaVA-JSON offset indexes (default: ~/.cache/mmjax)
    batch_size: int = _set_by_trainer(8, "batch_size / processes")  # rows per process
    seed: int = _set_by_trainer(0, "seed")
    num_epochs: int | None = _set_by_trainer(1, "None: repeat; total_steps decides")

    @property
    def row_len(self) -> int:
        return self.seq_len or self.max_length

    def image_slots(self, image_tokens: int) -> int:
        """Image slots per row: the vision tower encodes this many images per row, used or
        not, so a packed row gets only as many as its length can hold (`image_tokens`: an
        image's, at most)."""
        if self.max_images_per_row:
            return self.max_images_per_row
        return 1 if self.packing == "pad" else max(1, min(4, self.row_len // image_tokens))


def open_source(src: SourceConfig, cfg: DataConfig):
    if src.kind == "llava_json":
        return LlavaJsonSource(src.path, src.image_root, src.name or None, cfg.index_cache_dir)
    if src.kind == "arrayrecord":
        return ArrayRecordSource(src.path, src.name or "arrayrecord")
    if src.kind == "tfds":
        return TfdsCaptionSource.from_tfds(src.path, src.split, cfg.tfds_data_dir)
    raise ValueError(f"unknown source kind {src.kind!r}: llava_json, arrayrecord, tfds")


def make_encoder(cfg: DataConfig, tokenizer, model: LlavaConfig) -> ConversationEncoder:
    name = default_template(model.llm.family, tokenizer) if cfg.template == "auto" else \
        cfg.template
    return ConversationEncoder(tokenizer, get_template(name, tokenizer),
                               0 if model.anyres else model.image_tokens,  # anyres: per image
                               model.image_token_id, cfg.max_length, cfg.special_token_text,
                               model.video_token_id)


def check_aspect(cfg: DataConfig, model: LlavaConfig) -> None:
    """An any-resolution model trains on `image_aspect="anyres"` data, and only it does."""
    if model.anyres and cfg.image_aspect != "anyres":
        raise ConfigError(f"data.image_aspect={cfg.image_aspect!r}: the model has "
                          "image_grid_pinpoints (LLaVA-NeXT), set data.image_aspect=anyres")
    if cfg.image_aspect == "anyres" and not model.anyres:
        raise ConfigError("data.image_aspect=anyres needs a model with image_grid_pinpoints "
                          "(a LLaVA-NeXT checkpoint, or llava.image_grid_pinpoints)")


def image_spec(cfg: DataConfig, model: LlavaConfig) -> ImageSpec:
    """How the pipeline makes a sample's pixels for `model`."""
    v = model.vision
    return ImageSpec(v.image_size, v.image_mean, v.image_std, cfg.image_aspect,
                     cfg.max_image_pixels, cfg.normalize_on_host,
                     model if model.anyres else None, cfg.video_frames, cfg.video_fps)


def image_slots(cfg: DataConfig, model: LlavaConfig) -> int:
    """Image slots per row for `model` (any resolution: an image counted at its largest,
    the base view and the largest grid's tiles)."""
    return cfg.image_slots(model.view_tokens * model.max_views)


HOLDOUT_SEED = 20231005  # fixed: the held-out records do not change with the run's seed


class _Subset(grain.MapDataset):
    """The records of `parent` at `indices`, in that order."""

    def __init__(self, parent: grain.MapDataset, indices: np.ndarray):
        super().__init__(parent)
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[int(self._indices[index % len(self._indices)])]


def holdout_indices(n: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) record indices: a fixed random `share` of the n records (at least
    one) is held out, whatever the run's seed, so every evaluation sees the same records."""
    if not 0 < share < 1:
        raise ValueError(f"data.holdout_share {share} must be in (0, 1)")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    k = max(1, int(round(share * n)))
    return np.sort(order[k:]), np.sort(order[:k])


def build_pipeline(cfg: DataConfig, tokenizer, model: LlavaConfig,
                   sources: Sequence | None = None, process_index: int | None = None,
                   process_count: int | None = None, part: str = "train"
                   ) -> grain.DatasetIterator:
    """The per-process batch iterator. `sources` overrides opening `cfg.sources`. With
    `cfg.holdout_share`, `part` picks the training records or the held-out ones."""
    if cfg.row_len < cfg.max_length:
        raise ValueError(f"seq_len {cfg.row_len} < max_length {cfg.max_length}")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    sources = list(sources) if sources is not None else [open_source(s, cfg) for s in cfg.sources]
    datasets = [grain.MapDataset.source(s) for s in sources]
    if len(datasets) == 1:
        ds = datasets[0]
    else:
        weights = [s.weight for s in cfg.sources] if cfg.sources else [1.0] * len(datasets)
        ds = grain.MapDataset.mix(datasets, weights)
    if cfg.holdout_share:
        ds = _Subset(ds, holdout_indices(len(ds), cfg.holdout_share)[part == "heldout"])
    elif part == "heldout":
        raise ValueError("no held-out split: set data.holdout_share")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds[pi::pc]  # each process reads its own share
    check_aspect(cfg, model)
    v = model.vision
    slots = image_slots(cfg, model)
    processor = SampleProcessor(make_encoder(cfg, tokenizer, model), image_spec(cfg, model),
                                slots)
    # In the main process, threads overlap PIL's GIL-free decode and resize. Inside worker
    # processes one thread each is 4x faster than Grain's default 16 (measured by
    # mmjax.benchmarks.data_pipeline: 16 threads thrash on the GIL in every worker).
    threads = 1 if cfg.workers > 0 else 16
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(4, threads))
    report = lambda: SkipReport(cfg.max_bad_share, cfg.min_samples_before_abort)  # noqa: E731
    it = SkipFilterDataset(ds.map(processor).to_iter_dataset(read), report,
                           cfg.max_bad_in_a_row)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    spec = BatchSpec(cfg.batch_size, cfg.row_len, slots, v.image_size, cfg.packing,
                     cfg.pack_window, cfg.group_by_length, pad_id, cfg.seed,
                     "float32" if cfg.normalize_on_host else "uint8", tuple(cfg.length_buckets),
                     model.batch_views, model.view_tokens, model.taps)
    it = BatchDataset(it, spec)
    if cfg.workers > 0:  # workers make whole batches: one transfer per batch, not per sample
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.workers, per_worker_buffer_size=cfg.worker_buffer),
            worker_init_fn=die_with_parent)
    return ReportDataset(it, report).__iter__()


def die_with_parent(*_) -> None:
    """In a worker process: the kernel kills it when the process that started it dies, even
    by SIGKILL (Linux `PR_SET_PDEATHSIG`), so no worker outlives a killed run."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _absl_flags_ready() -> None:
    # Grain's worker processes read absl flags; a program without absl.app has not parsed them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def skip_report(iterator) -> SkipReport:
    """The SkipReport of a `build_pipeline` iterator (counts by reason, summary, metrics)."""
    report = getattr(iterator, "report", None)
    if not isinstance(report, SkipReport):
        raise ValueError("not an mmjax data pipeline iterator (build_pipeline's)")
    return report
