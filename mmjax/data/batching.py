"""Count and drop skipped samples, pad or pack into fixed shapes, add up the counts.

Axis legend: B rows, T sequence length, M image slots per row, S image size.

Batches are in the format `mmjax.batch` defines (ids, shifted targets, segment ids,
positions, image slots).

All stages are checkpointable Grain iterators. Batching works on windows of samples (one
batch, or `window` samples for packing and length grouping): the state is the parent's state
at the window start plus how many of its batches were emitted, and a restore re-reads and
re-packs the window, which is deterministic.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import grain
import numpy as np

from mmjax import batch as batch_format
from mmjax.data.quality import DataStalled, Skipped, SkipReport, log
from mmjax.data.tokenize import ENCODING_VERSION
from mmjax.models.anyres import place_sources


class SkipFilterDataset(grain.IterDataset):
    """Drops `Skipped` markers, remembering per reason how many since the last batch.

    Runs where the samples are made (a Grain worker, or the main process without workers);
    `BatchDataset` hands the tallies downstream inside the batches and `ReportDataset`, in
    the main process, adds them up, so the totals cover every worker. Liveness is checked
    here, on the samples read (not the batches delivered, which never come when every sample
    is bad): the bad share of this reader's samples, and `max_bad_in_a_row` skipped samples
    with none usable stop the run with the top reasons and an example.
    """

    def __init__(self, parent: grain.IterDataset, report_factory, max_bad_in_a_row: int = 0):
        super().__init__(parent)
        self._report_factory = report_factory
        self._max_bad_in_a_row = max_bad_in_a_row

    def __iter__(self):
        return _SkipFilterIterator(self._parent.__iter__(), self._report_factory(),
                                   self._max_bad_in_a_row)


def empty_tally() -> dict:
    return {"seen": 0, "truncated_turns": 0, "counts": {}}


class _SkipFilterIterator(grain.DatasetIterator):
    def __init__(self, parent, report: SkipReport, max_bad_in_a_row: int = 0):
        super().__init__(parent)
        self.tally = empty_tally()
        self.report = report  # everything this reader has read (share and stall checks)
        self.max_bad_in_a_row = max_bad_in_a_row
        self.bad_in_a_row = 0
        self._logged: dict[str, int] = {}

    def take_tally(self) -> dict:
        tally, self.tally = self.tally, empty_tally()
        return tally

    def __next__(self):
        while True:
            item = next(self._parent)
            self.tally["seen"] += 1
            self.report.seen += 1
            if isinstance(item, Skipped):
                self._skipped(item)
                continue
            self.bad_in_a_row = 0
            self.tally["truncated_turns"] += int(item.get("dropped_turns", 0))
            return item

    def _skipped(self, item: Skipped) -> None:
        counts = self.tally["counts"]
        counts[item.reason] = counts.get(item.reason, 0) + 1
        n = self._logged[item.reason] = self._logged.get(item.reason, 0) + 1
        if n <= 3:
            log.warning("skipped sample %s: %s%s", item.sample_id, item.reason,
                        f" ({item.detail})" if item.detail else "")
        self.bad_in_a_row += 1
        self.report.skip(item)
        if self.max_bad_in_a_row and self.bad_in_a_row >= self.max_bad_in_a_row:
            raise DataStalled(
                f"{self.bad_in_a_row} samples in a row were skipped and none was usable "
                f"(data.max_bad_in_a_row): {self.report.top_reasons()}. Check the sources' "
                "paths and image_root, and max_length.")
        self.report.check()

    def get_state(self):
        return {"parent": self._parent.get_state(), "tally": self.tally,
                "bad_in_a_row": self.bad_in_a_row, "read": self.report.state()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.tally = state["tally"]
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        if "read" in state:  # absent in data states saved before mmjax checked liveness
            self.report.load_state(state["read"])


class ReportDataset(grain.IterDataset):
    """Main process: adds up the tallies batches carry, aborts past the allowed bad share."""

    def __init__(self, parent: grain.IterDataset, report_factory):
        super().__init__(parent)
        self._report_factory = report_factory

    def __iter__(self):
        return _ReportIterator(self._parent.__iter__(), self._report_factory())


class _ReportIterator(grain.DatasetIterator):
    def __init__(self, parent, report: SkipReport):
        super().__init__(parent)
        self.report = report

    def __next__(self):
        try:
            batch = next(self._parent)
        except StopIteration:
            self.report.check(final=True)
            raise
        self.report.add(batch.pop("tally"))
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "report": self.report.state(),
                "encoding_version": ENCODING_VERSION}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.report.load_state(state["report"])
        saved = state.get("encoding_version", 1)
        if saved != ENCODING_VERSION:
            log.warning("the data position was saved under conversation encoding version %s; "
                        "this mmjax encodes with version %s (see mmjax.data.tokenize): the "
                        "run continues in the same sample order, with the new token layout",
                        saved, ENCODING_VERSION)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    batch_size: int  # rows per batch (per process)
    seq_len: int  # T
    max_images: int  # M image slots per row
    image_size: int  # S
    mode: Literal["pad", "first_fit", "best_fit"] = "pad"
    window: int = 0  # samples per packing / grouping window (0: a sensible default)
    group_by_length: bool = False  # pad mode: sort a window by length into batches
    pad_id: int = 0
    seed: int = 0
    pixel_dtype: Literal["uint8", "float32"] = "uint8"
    length_buckets: tuple[int, ...] = ()  # pad mode: row length = smallest bucket that fits
    views: int = 0  # any resolution: views per image slot (then image_sources too)
    view_tokens: int = 0  # any resolution: LLM tokens per view
    taps: int = 1  # features each image token takes (OneVision: 4, with image_weights)

    def row_length(self, longest: int) -> int:
        fits = [b for b in sorted(self.length_buckets) if b >= longest]
        return fits[0] if fits else self.seq_len

    def window_size(self) -> int:
        if self.window:
            return self.window
        if self.mode == "pad":
            return self.batch_size * (16 if self.group_by_length else 1)
        return self.batch_size * 32


def pack(lengths: list[int], images: list[int], capacity: int, max_images: int,
         mode: str) -> list[list[int]]:
    """Bins (lists of sample indices) for samples of given lengths and image counts."""
    order = list(range(len(lengths)))
    if mode == "best_fit":
        order.sort(key=lambda i: -lengths[i])  # best-fit decreasing
    bins: list[list[int]] = []
    room: list[int] = []
    slots: list[int] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]
                and slots[b] >= images[i]]
        if not fits:
            bins.append([i])
            room.append(capacity - lengths[i])
            slots.append(max_images - images[i])
            continue
        b = fits[0] if mode == "first_fit" else min(fits, key=lambda k: room[k])
        bins[b].append(i)
        room[b] -= lengths[i]
        slots[b] -= images[i]
    return bins


class BatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, spec: BatchSpec):
        super().__init__(parent)
        if spec.mode not in ("pad", "first_fit", "best_fit"):
            raise ValueError(f"unknown batching mode {spec.mode!r}: pad, first_fit, best_fit")
        self.spec = spec

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self.spec)


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, spec: BatchSpec):
        super().__init__(parent)
        self.spec = spec
        self._pending: list[dict] = []
        self._window_state: Any = None
        self._window = 0  # index of the next window to read
        self._emitted = 0

    def __next__(self):
        if not self._pending:
            self._read_window()
        self._emitted += 1
        return self._pending.pop(0)

    def _read_window(self):
        self._window_state = self._parent.get_state()
        samples = []
        for _ in range(self.spec.window_size()):
            try:
                samples.append(next(self._parent))
            except StopIteration:
                break
        tally = self._parent.take_tally() if hasattr(self._parent, "take_tally") else None
        if not samples:
            if tally and tally["seen"]:  # only skipped samples were left: report them
                self._pending = [dict(self._materialise([], []), tally=tally)]
                self._window += 1
                self._emitted = 0
                return
            raise StopIteration
        self._pending = self._batches(samples, self._window)
        # The window's tally rides on its first batch (a restore that re-reads the window
        # skips that batch if it was emitted, so nothing is counted twice).
        for k, batch in enumerate(self._pending):
            batch["tally"] = tally if (k == 0 and tally) else empty_tally()
        self._window += 1
        self._emitted = 0

    def _batches(self, samples: list[dict], window: int) -> list[dict]:
        s = self.spec
        if s.mode == "pad":
            order = list(range(len(samples)))
            if s.group_by_length:
                order.sort(key=lambda i: len(samples[i]["input_ids"]))
            rows = [[i] for i in order]
        else:
            rows = pack([len(x["input_ids"]) for x in samples],
                        [len(x["images"]) for x in samples], s.seq_len, s.max_images, s.mode)
        chunks = [rows[i:i + s.batch_size] for i in range(0, len(rows), s.batch_size)]
        if s.group_by_length and len(chunks) > 1:  # don't feed short-to-long in order
            rng = np.random.default_rng([s.seed, window])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return [self._materialise(samples, chunk) for chunk in chunks]

    def _materialise(self, samples, rows) -> dict:
        s = self.spec
        b, t = s.batch_size, s.seq_len
        if s.mode == "pad" and s.length_buckets and rows:
            t = s.row_length(max(len(samples[i]["input_ids"]) for row in rows for i in row))
        out = dict(batch_format.empty(b, t, s.max_images, s.image_size, s.pad_id, s.pixel_dtype,
                                      s.views, s.taps), ids=[])
        for r, row in enumerate(rows):
            pos, slot, ids = 0, 0, []
            for seg, i in enumerate(row, start=1):
                x = samples[i]
                n = len(x["input_ids"])
                if pos + n > t:
                    raise AssertionError("packing overflowed a row")  # cannot happen
                out["input_ids"][r, pos:pos + n] = x["input_ids"]
                out["targets"][r, pos:pos + n - 1] = x["labels"][1:]
                out["segment_ids"][r, pos:pos + n] = seg
                out["positions"][r, pos:pos + n] = np.arange(n)
                k = len(x["images"])
                out["pixel_values"][r, slot:slot + k] = x["images"]
                if s.views:
                    out["image_sources"][r, pos:pos + n] = place_sources(
                        x["sources"], slot, s.max_images, s.views, s.view_tokens)
                    if s.taps > 1:
                        out["image_weights"][r, pos:pos + n] = x["weights"]
                pos, slot = pos + n, slot + k
                ids.append(x["id"])
            out["ids"].append(ids)
        out["ids"] += [[] for _ in range(b - len(rows))]
        return out

    def get_state(self):
        if not self._pending:
            return {"parent": self._parent.get_state(), "emitted": 0, "window": self._window}
        return {"parent": self._window_state, "emitted": self._emitted,
                "window": self._window - 1}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._window = int(state["window"])
        self._pending = []
        if int(state["emitted"]):
            self._read_window()
            self._pending = self._pending[int(state["emitted"]):]
            self._emitted = int(state["emitted"])

