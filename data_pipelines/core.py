"""The converter driver: raw samples in, ArrayRecord shards (or LLaVA JSONL) out.

A converter is a generator of `Raw` samples (or `mmjax.data.quality.Skipped` markers, the
training pipeline's reasons and report) in a deterministic order.
`build` turns them into output shards:

    OUT/NAME-00000.arrayrecord ...   samples in `mmjax.data.records` form, image bytes inside
    OUT/index.jsonl                  {"id", "shard", "position"} per sample, in order
    OUT/manifest.json                counts, skips by reason, shards, settings
    OUT/report.json, report.md, report_lengths.png   (data_pipelines.report)

- Deterministic: the same inputs and settings give byte-identical shards.
- Resumable: each finished shard is recorded in OUT/progress.json with how many input
  samples it consumed; a rerun skips those inputs (without reading their images) and
  continues with the next shard. A shard is written to a temporary name and renamed.
- Nothing is lost silently: every input sample is either written or counted under a reason.
  Ids are made unique without dropping anything: a record whose id was seen before (the
  released LLaVA files repeat ids a lot: one COCO image's conversation, detail and reasoning
  records, the VQA parts of the 665K mix) is written as `ID#POSITION` (its input position);
  every record keeps the input's id as `source_id`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data_pipelines import storage
from mmjax.data import records
from mmjax.data.image import ImageError, check_relative, decode_image, resolve_image_path
from mmjax.data.quality import EXAMPLES_PER_REASON, REASONS, Skipped, SkipReport
from mmjax.data.templates import ConversationError, normalize_turns


class BuildError(RuntimeError):
    """A build that cannot go on as asked (the message says what to do)."""


@dataclasses.dataclass
class Raw:
    """One sample before images are read: paths (under the image root) or bytes."""

    id: str
    conversations: list[dict]
    images: list = dataclasses.field(default_factory=list)  # str paths or bytes
    source: str = ""
    video: str | bytes | None = None  # a LLaVA-OneVision video sample: its path or bytes


@dataclasses.dataclass(frozen=True)
class Part:
    """A part of a build's input that reads on its own: `read()` gives its samples in order;
    `size`, when known without reading, is how many it gives."""

    read: Callable[[], Iterable[Raw | Skipped]]
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    name: str
    out: Path
    image_root: Path | None = None
    shard_size: int = 1000  # samples per shard
    output: str = "arrayrecord"  # arrayrecord | llava_jsonl
    max_side: int = 0  # re-encode images larger than this (0: keep the original bytes)
    quality: int = 90  # JPEG quality when re-encoding
    reencode: bool = False  # re-encode every image (e.g. to JPEG) even if small
    limit: int = 0  # stop after this many input samples (0: all); for trials
    duplicate_images: str = "keep"  # a sample whose images are an earlier one's: keep | drop
    fetch_urls: bool = False  # fetch images given as http(s) URLs (else they are missing)
    fetch_timeout: float = 10.0  # seconds per attempt
    fetch_retries: int = 2  # more attempts after a timeout, a lost connection or a 5xx / 429


def read_image(item, image_root: Path | None, cfg: BuildConfig) -> tuple[bytes, tuple[int, int]]:
    """Image bytes (re-encoded if asked) and (width, height); raises ImageError."""
    from PIL import Image

    if isinstance(item, (bytes, bytearray)):
        data = bytes(item)
    elif isinstance(item, str) and item.startswith(("http://", "https://")):
        if not cfg.fetch_urls:
            raise ImageError("missing_image", f"{item}: a URL (--fetch-urls fetches them)")
        data = fetch(item, cfg.fetch_timeout, cfg.fetch_retries)
    else:
        data = file_bytes(item, image_root)
    image = decode_image(data)  # checks: empty, truncated, corrupt, decompression bomb
    size = image.size
    if cfg.reencode or (cfg.max_side and max(size) > cfg.max_side):
        if cfg.max_side and max(size) > cfg.max_side:
            scale = cfg.max_side / max(size)
            image = image.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))),
                                 Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=cfg.quality)
        data, size = buf.getvalue(), image.size
    return data, size


RETRY_STATUS = (429, 500, 502, 503, 504)


def fetch(url: str, timeout: float, retries: int, backoff: float = 0.5) -> bytes:
    """An image's bytes from a URL; ImageError('fetch_failed') after the retries (a 4xx other
    than 429 is not retried)."""
    last = ""
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "mmjax-data-pipelines"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code not in RETRY_STATUS:
                break
        except (urllib.error.URLError, OSError, ValueError) as e:  # timeouts among them
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise ImageError("fetch_failed", f"{url}: {last} ({attempt + 1} attempt(s))")


def check_conversation(raw: Raw) -> Skipped | None:
    """The checks the training pipeline applies (mmjax.data.templates.normalize_turns: turn
    shape, roles, alternation, empty replies), plus the `<image>` count."""
    try:
        normalize_turns(raw.conversations)
    except ConversationError as e:
        return Skipped(e.reason, raw.id, e.detail)
    n_tags = sum(t["value"].count("<image>") for t in raw.conversations)
    if raw.video is not None and raw.images:
        return Skipped("malformed_record", raw.id, "a record with both images and a video")
    media = len(raw.images) + (raw.video is not None)  # a video's text has one <image>
    if n_tags != media:
        return Skipped("image_count_mismatch", raw.id,
                       f"{n_tags} <image> tags, {len(raw.images)} images"
                       + (" and a video" if raw.video is not None else ""))
    return None


def local_output(out) -> Path:
    """The in-process build's output directory, which must be local or mounted: a URL
    (gs://, s3://) is refused rather than written as a local folder of that name."""
    if "://" in str(out):
        raise BuildError(f"--out {out}: the in-process build writes a local or mounted "
                         "directory; a Beam build (--runner ...) writes to store URLs")
    return Path(out)


def settings_of(cfg: BuildConfig) -> dict:
    """The settings a build's output depends on (a rerun into the same directory must match)."""
    return {k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "limit")}


def build(samples: Iterable[Raw | Skipped], cfg: BuildConfig,
          progress: Callable[[Iterable], Iterator] | None = None) -> dict:
    """Writes `samples` to `cfg.out` as shards; resumes a previous partial build."""
    cfg = dataclasses.replace(cfg, out=local_output(cfg.out), image_root=(
        cfg.image_root if storage.is_url(cfg.image_root) else Path(cfg.image_root))
        if cfg.image_root else None)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(cfg)
    prog_path = out / "progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.exists() else None
    if prog is not None and prog["settings"] != settings:
        raise BuildError(f"{out} holds a build with other settings {prog['settings']}; use a "
                         "new output directory or delete it")
    prog = prog or {"settings": settings, "shards": [], "report": {}, "written": 0,
                    "done": False}
    if prog["done"]:
        print(f"{out}: already complete ({prog['written']} samples)")
        return json.loads((out / "manifest.json").read_text())
    report = SkipReport(max_bad_share=1.0)  # counts; converters never abort on a share
    report.load_state(prog["report"])
    resume_at = report.seen
    ids = _Ids()
    dups = Duplicates(cfg.duplicate_images, prog.get("duplicates"))
    if (out / "index.jsonl").exists():
        _truncate_index(out, prog["written"])  # lines past the last finished shard go
    if resume_at:
        for line in (out / "index.jsonl").read_text().splitlines():
            rec = json.loads(line)
            ids.add(rec["id"], rec.get("source_id", rec["id"]))
            dups.first(rec.get("images_sha256"), rec["source_id"], rec["input"])
        print(f"{out}: resuming after {len(prog['shards'])} shard(s), {resume_at} inputs")
    pending: list[tuple[str, str, bytes | dict, dict]] = []  # (id, source id, record, meta)
    index = open(out / "index.jsonl", "a")
    it = iter(samples)
    if progress is not None:
        it = progress(it)
    try:
        for n, sample in enumerate(it):
            if cfg.limit and n >= cfg.limit:
                break
            if n < resume_at:  # consumed by finished shards
                continue
            report.seen += 1
            item = _prepare(sample, cfg, ids, dups, n)
            if isinstance(item, Skipped):
                report.skip(item)
            else:
                pending.append(item)
                if len(pending) == cfg.shard_size:
                    _flush(out, cfg, prog, report, dups, pending, index)
                    pending = []
        if pending:
            _flush(out, cfg, prog, report, dups, pending, index)
    finally:
        index.close()
    prog["done"] = True
    prog["report"] = report.state()
    manifest = {"name": cfg.name, "settings": settings, "shards": [s["file"] for s in
                                                                  prog["shards"]],
                "samples": prog["written"], "inputs": report.seen, "skipped": report.counts,
                "skipped_examples": report.examples, "output": cfg.output,
                "duplicate_images": dups.summary()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _atomic_write(prog_path, json.dumps(prog))
    return manifest


class _Ids:
    """Output ids so far, and the input ids they came from."""

    def __init__(self):
        self.written: set[str] = set()
        self.sources: set[str] = set()

    def add(self, out_id: str, source_id: str) -> None:
        self.written.add(out_id)
        self.sources.add(source_id)

    def unique(self, source_id: str, position: int) -> str:
        if source_id not in self.sources and source_id not in self.written:
            return source_id
        out = f"{source_id}#{position}"
        while out in self.written:  # an input id that already looks like this
            out += "#"
        return out


def read_sample(sample: Raw | Skipped, cfg: BuildConfig):
    """The checks and image reads of one sample (the same for every runner): a `Skipped`, or
    (image bytes, (width, height) per image, the video's bytes or None)."""
    if isinstance(sample, Skipped):
        return sample
    bad = check_conversation(sample)
    if bad is not None:
        return bad
    images, sizes = [], []
    for item in sample.images:
        try:
            data, size = read_image(item, cfg.image_root, cfg)
        except ImageError as e:
            reason = e.reason if e.reason in REASONS else "corrupt_image"
            return Skipped(reason, sample.id, e.detail)
        images.append(data)
        sizes.append(size)
    video = None
    if sample.video is not None:
        try:
            video = read_video_bytes(sample.video, cfg.image_root)
        except ImageError as e:
            return Skipped(e.reason, sample.id, e.detail)
    return images, sizes, video


def file_bytes(item: str, image_root, what: str = "") -> bytes:
    """The bytes of a file named relative to the image root, on disk or in a store;
    ImageError `missing_image` naming `what` it is."""
    name = f"{what} {item}".strip()
    if storage.is_url(image_root):  # a store has no symlinks: the path's own checks
        try:
            return storage.read_bytes(storage.join(image_root, check_relative(item)))
        except (OSError, IOError) as e:
            raise ImageError("missing_image", f"{name}: {e}") from None
    if image_root is None:
        raise ImageError("missing_image", f"{name}: no image root given")
    try:
        return resolve_image_path(image_root, item).read_bytes()
    except OSError as e:
        raise ImageError("missing_image", f"{name}: {e}") from None


def read_video_bytes(item, image_root) -> bytes:
    """A video's file bytes, as it is (the training pipeline decodes it); ImageError."""
    data = bytes(item) if isinstance(item, (bytes, bytearray)) else file_bytes(
        item, image_root, "video")
    if not data:
        raise ImageError("empty_video", f"video {item}: 0 bytes")
    return data


def encode_sample(out_id: str, sample: Raw, images: list[bytes], sizes, video: bytes | None,
                  cfg: BuildConfig):
    """The output record of a sample under its output id: `mmjax.data.records` bytes, or a
    LLaVA JSON object (images that are not files under the root go to OUT/images, videos
    given as bytes to OUT/videos)."""
    extra = {"image_wh": sizes, "source_id": sample.id}
    if cfg.output == "arrayrecord":
        return records.encode(out_id, sample.conversations, images, sample.source or cfg.name,
                              extra, video)
    rec = {"id": out_id, "conversations": sample.conversations,
           "source": sample.source or cfg.name, **extra}
    paths = [p for p in sample.images if isinstance(p, str)]
    if len(paths) != len(sample.images) or (cfg.reencode or cfg.max_side):
        # images that are not files under the root (tar members, re-encoded) go to OUT/images
        paths = []
        for k, data in enumerate(images):
            name = f"images/{hashlib.sha1(f'{out_id}/{k}'.encode()).hexdigest()}.jpg"
            (cfg.out / "images").mkdir(exist_ok=True)
            (cfg.out / name).write_bytes(data)
            paths.append(name)
    if paths:
        rec["image"] = paths[0] if len(paths) == 1 else paths
    if video is not None:
        if isinstance(sample.video, str):
            rec["video"] = sample.video
        else:
            name = f"videos/{hashlib.sha1(f'{out_id}/video'.encode()).hexdigest()}.mp4"
            (cfg.out / "videos").mkdir(exist_ok=True)
            (cfg.out / name).write_bytes(video)
            rec["video"] = name
    return rec


def renamed(record: bytes, out_id: str) -> bytes:
    """An ArrayRecord-output record of `encode_sample` under another output id: the bytes
    `encode_sample(out_id, ...)` gives."""
    h = records.decode(record)
    return records.encode(out_id, h["conversations"], h["images"], h["source"],
                          {"image_wh": h["image_wh"], "source_id": h["source_id"]},
                          h.get("video"))


def images_sha256(images: list[bytes]) -> str | None:
    """One digest of a sample's images as stored (None: no image)."""
    if not images:
        return None
    return hashlib.sha256(b"".join(hashlib.sha256(i).digest() for i in images)).hexdigest()


class Duplicates:
    """Samples whose images are, byte for byte, an earlier written sample's: reported, and
    dropped (a `duplicate_image` skip) in mode 'drop'. The first sample with the images
    keeps them; 'earlier' is input order."""

    def __init__(self, mode: str = "keep", state: dict | None = None):
        if mode not in ("keep", "drop"):
            raise BuildError(f"duplicate images: keep or drop, not {mode!r}")
        self.mode = mode
        self.seen: dict[str, tuple[str, int]] = {}
        self.count = (state or {}).get("count", 0)
        self.examples: list[str] = list((state or {}).get("examples", []))

    def first(self, digest: str | None, source_id: str, position: int) -> None:
        if digest is not None:
            self.seen.setdefault(digest, (source_id, position))

    def check(self, digest: str | None, source_id: str, position: int) -> str | None:
        """None for images not seen before (now seen), else what they duplicate."""
        if digest is None:
            return None
        if digest not in self.seen:
            self.seen[digest] = (source_id, position)
            return None
        first_id, first_position = self.seen[digest]
        detail = f"the same image(s) as {first_id} (input {first_position})"
        self.count += 1
        if len(self.examples) < EXAMPLES_PER_REASON:
            self.examples.append(f"{source_id} (input {position}): {detail}")
        return detail

    def state(self) -> dict:
        return {"count": self.count, "examples": self.examples}

    def summary(self) -> dict:
        return {"mode": self.mode, **self.state()}


def _prepare(sample, cfg: BuildConfig, ids: _Ids, dups: Duplicates, position: int):
    got = read_sample(sample, cfg)
    if isinstance(got, Skipped):
        return got
    digest = images_sha256(got[0])
    duplicate = dups.check(digest, sample.id, position)
    if duplicate is not None and dups.mode == "drop":
        return Skipped("duplicate_image", sample.id, duplicate)
    out_id = ids.unique(sample.id, position)
    ids.add(out_id, sample.id)
    meta = {"input": position, **({"images_sha256": digest} if digest else {})}
    return out_id, sample.id, encode_sample(out_id, sample, *got, cfg), meta


def _flush(out: Path, cfg: BuildConfig, prog: dict, report: SkipReport, dups: Duplicates,
           pending, index) -> None:
    k = len(prog["shards"])
    if cfg.output == "arrayrecord":
        name = f"{cfg.name}-{k:05d}.arrayrecord"
        tmp = out / (name + ".tmp")
        records.write_shard(tmp, [rec for _, _, rec, _ in pending])
    else:
        name = f"{cfg.name}-{k:05d}.jsonl"
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(rec, ensure_ascii=False) + "\n"
                               for _, _, rec, _ in pending))
    os.replace(tmp, out / name)
    for pos, (sample_id, source_id, _, meta) in enumerate(pending):
        index.write(json.dumps({"id": sample_id, "source_id": source_id, "shard": name,
                                "position": pos, **meta}) + "\n")
    index.flush()
    prog["written"] += len(pending)
    prog["shards"].append({"file": name, "samples": len(pending)})
    prog["report"] = report.state()
    prog["duplicates"] = dups.state()
    _atomic_write(out / "progress.json", json.dumps(prog))


def _truncate_index(out: Path, written: int) -> None:
    """Drops index lines past the last finished shard (a crash between shard and index)."""
    lines = (out / "index.jsonl").read_text().splitlines(keepends=True)[:written]
    _atomic_write(out / "index.jsonl", "".join(lines))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
