"""Bad samples: never a crash, never silent.

A sample that cannot be used becomes a `Skipped(reason, id)` marker instead of an exception.
The pipeline (`mmjax.data.batching`) drops the markers, logs the first few of each reason with
their sample ids, and adds up the counts in a `SkipReport`, which aborts with a clear error
when their share passes the configured maximum. The counts are part of the iterator state
and of the metrics. The dataset converters (`data_pipelines`) count with the same reasons
and the same report.
"""
from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger("mmjax.data")

REASONS = (
    "missing_image",  # the image file does not exist
    "corrupt_image",  # unreadable, truncated or not an image
    "empty_image",  # zero width or height
    "image_too_large",  # more pixels than the decompression-bomb limit
    "corrupt_video",  # a video that does not decode (or PyAV is not installed)
    "empty_video",  # a video without frames
    "unsafe_image_path",  # '..', absolute, or a symlink out of the image root
    "malformed_record",  # a JSON line that does not parse, or a record of the wrong shape
    "unknown_role",  # a turn whose 'from' is not human/gpt (or user/assistant/system)
    "turns_not_alternating",  # human and gpt turns out of order
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "empty_reply",  # an assistant turn with no text
    "too_long",  # does not fit max_length even after dropping later turns
    "tokenization_mismatch",  # rendered text and token/label layout disagree
    "special_token_text",  # sample text the tokenizer would read as a control token
    # dataset conversion (data_pipelines) only:
    "no_answer",  # a question without an annotated answer
    "bad_choice",  # a multiple-choice answer that is not one of the choices
    "empty_text",  # a caption or question with no text
    "duplicate_image",  # the same image bytes as an earlier sample (--duplicate-images drop)
    "fetch_failed",  # an image URL that did not answer with an image (--fetch-urls)
)
EXAMPLES_PER_REASON = 5


class BadShareExceeded(RuntimeError):
    """Raised when skipped samples pass the configured maximum share."""


class DataStalled(RuntimeError):
    """Raised when many samples in a row were skipped and none was usable (a wrong image
    root, a max_length below every sample): the run would otherwise spin forever."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in the stream for a sample that was dropped, and says why."""

    reason: str
    sample_id: str
    detail: str = ""

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}; add it to REASONS")


class SkipReport:
    """Counts per reason, with the number of samples seen; merges and serialises."""

    def __init__(self, max_bad_share: float = 0.05, min_samples: int = 200):
        self.max_bad_share = max_bad_share
        self.min_samples = min_samples
        self.seen = 0
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}  # a few "id: detail" per reason
        self.truncated_turns = 0

    def skip(self, item: Skipped) -> None:
        """Counts one skipped sample (the caller counts it as seen), keeping an example."""
        self.counts[item.reason] = self.counts.get(item.reason, 0) + 1
        examples = self.examples.setdefault(item.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{item.sample_id}: {item.detail}"[:300])

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, tally: dict) -> None:
        """Adds a tally {'seen', 'counts', 'truncated_turns'} and checks the share."""
        self.seen += int(tally["seen"])
        self.truncated_turns += int(tally["truncated_turns"])
        for reason, n in tally["counts"].items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        self.check()

    def check(self, final: bool = False) -> None:
        if self.seen < (1 if final else self.min_samples):
            return
        share = self.skipped / self.seen
        if share > self.max_bad_share:
            raise BadShareExceeded(
                f"{self.skipped} of {self.seen} samples ({share:.1%}) were skipped, more than "
                f"the allowed {self.max_bad_share:.1%} (data.max_bad_share): "
                f"{self.top_reasons()}. Fix the data or raise the limit.")

    def top_reasons(self, n: int = 3) -> str:
        """'missing_image 812 (e.g. s17: img/3.jpg), too_long 4 (e.g. ...)'."""
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{r} {c}" + (f" (e.g. {self.examples[r][0]})"
                                       if self.examples.get(r) else "") for r, c in top)

    def metrics(self) -> dict[str, float]:
        out = {f"data/skipped/{k}": float(v) for k, v in sorted(self.counts.items())}
        out["data/samples_seen"] = float(self.seen)
        out["data/skipped_total"] = float(self.skipped)
        out["data/truncated_turns"] = float(self.truncated_turns)
        return out

    def vector(self) -> list[int]:
        """[seen, truncated_turns, count per REASONS entry]: sums across processes."""
        return [self.seen, self.truncated_turns] + [self.counts.get(r, 0) for r in REASONS]

    @classmethod
    def from_vector(cls, vector, max_bad_share: float = 0.05) -> "SkipReport":
        report = cls(max_bad_share)
        report.seen, report.truncated_turns = int(vector[0]), int(vector[1])
        report.counts = {r: int(n) for r, n in zip(REASONS, vector[2:]) if n}
        return report

    def summary(self) -> str:
        if not self.skipped:
            return f"data: {self.seen} samples, none skipped"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return (f"data: {self.seen} samples, {self.skipped} skipped "
                f"({self.skipped / max(self.seen, 1):.2%}): {parts}")

    def state(self) -> dict:
        return {"seen": self.seen, "counts": dict(self.counts),
                "truncated_turns": self.truncated_turns,
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state(self, state: dict) -> None:
        self.seen = int(state.get("seen", 0))
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}
        self.truncated_turns = int(state.get("truncated_turns", 0))
        self.examples = {k: list(v) for k, v in state.get("examples", {}).items()}
