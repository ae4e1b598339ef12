"""Random-access sources of raw samples, all yielding one record form:

    {"id": str, "images": [relative path | bytes | uint8 array, ...], "conversations": [...],
     "source": str}                      or a quality.Skipped marker for unreadable records
    (a LLaVA-OneVision video record also "video": its relative path, the text's <image>
     standing for it, as LLaVA-NeXT's video data writes it)

- `LlavaJsonSource`: LLaVA-format JSON (an array) or JSONL with an image root. The file is
  indexed once per host (byte offsets, streamed with bounded memory, cached beside the file
  or in `cache_dir`); each read seeks and parses one record, so neither workers nor hosts
  hold the parsed file (the 665K mix is about 1 GB of JSON).
- `ArrayRecordSource`: shards written by `data_pipelines/` (`mmjax.data.records` format).
- `TfdsCaptionSource`: a locally prepared TFDS captions dataset (`coco_captions`) through
  `tfds.data_source`, mapped to one caption conversation per image.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from mmjax.data import records
from mmjax.data.quality import Skipped

_CHUNK = 16 << 20


class DataSourceError(ValueError):
    """A source that cannot be read at all (as opposed to one bad record)."""


def default_cache_dir() -> Path:
    """Where derived files go unless asked otherwise: $MMJAX_CACHE_DIR, else
    $XDG_CACHE_HOME/mmjax (~/.cache/mmjax); never beside the data."""
    if os.environ.get("MMJAX_CACHE_DIR"):
        return Path(os.environ["MMJAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmjax"


def _index_path(path: Path, cache_dir: str | None) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "index"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{path.name}.{key}.index.npy"


def _scan_jsonl(path: Path) -> np.ndarray:
    starts, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                starts.append((pos, len(line)))
            pos += len(line)
    return np.asarray(starts, np.int64).reshape(-1, 2)


def _scan_json_array(path: Path) -> np.ndarray:
    """(byte offset, byte length) of each top-level element, streaming the file."""
    decoder = json.JSONDecoder()
    spans = []
    with open(path, "rb") as f:
        raw, base = b"", 0  # base: file offset of raw[0]
        text, i = "", 0
        started = done = False

        def refill():
            nonlocal raw, text, i, base
            more = f.read(_CHUNK)
            if not more:
                return False
            consumed = len(text[:i].encode())
            base += consumed
            raw = raw[consumed:] + more
            try:
                text = raw.decode()
            except UnicodeDecodeError as e:  # a multi-byte char cut at the chunk edge
                text = raw[:e.start].decode()
            i = 0
            return True

        refill()
        while not done:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text):
                if not refill():
                    break
                continue
            if not started:
                if text[i] != "[":
                    raise DataSourceError(f"{path}: a LLaVA JSON file must hold an array "
                                          "(use .jsonl for one record per line)")
                started, i = True, i + 1
                continue
            if text[i] == "]":
                done = True
                break
            try:
                _, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                if refill():
                    continue
                raise DataSourceError(f"{path}: malformed JSON near byte "
                                      f"{base + len(text[:i].encode())}: {e.msg}") from None
            start = base + len(text[:i].encode())
            spans.append((start, len(text[i:end].encode())))
            i = end
    if not done:
        raise DataSourceError(f"{path}: JSON array is not closed (truncated file?)")
    return np.asarray(spans, np.int64).reshape(-1, 2)


class LlavaJsonSource:
    """LLaVA JSON / JSONL with an image root; records parsed one at a time on demand."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike = "",
                 name: str | None = None, cache_dir: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataSourceError(f"data file {self.path} does not exist")
        self.image_root = str(image_root)
        self.name = name or self.path.stem
        index = _index_path(self.path, cache_dir)
        if index.exists():
            self.spans = np.load(index, mmap_mode="r")
        else:
            jsonl = self.path.suffix == ".jsonl"
            self.spans = _scan_jsonl(self.path) if jsonl else _scan_json_array(self.path)
            tmp = index.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, self.spans)
            os.replace(tmp, index)  # atomic: concurrent hosts/processes may race here

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int):
        start, length = (int(x) for x in self.spans[index])
        with open(self.path, "rb") as f:
            f.seek(start)
            raw = f.read(length)
        fallback_id = f"{self.name}:{index}"
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Skipped("malformed_record", fallback_id, f"bad JSON: {e}")
        if not isinstance(rec, dict):
            return Skipped("malformed_record", fallback_id, "record is not an object")
        image = rec.get("image")
        images = [] if image is None else (image if isinstance(image, list) else [image])
        out = {"id": str(rec.get("id", fallback_id)), "images": images,
               "conversations": rec.get("conversations"), "source": self.name,
               "image_root": self.image_root}
        if rec.get("video") is not None:
            out["video"] = rec["video"]
        return out

    def __repr__(self):
        return f"LlavaJsonSource({self.path}, {len(self)} records)"


class ArrayRecordSource:
    """ArrayRecord shards of `mmjax.data.records` samples (image bytes embedded)."""

    def __init__(self, paths: Sequence[str | os.PathLike] | str, name: str = "arrayrecord"):
        if isinstance(paths, (str, os.PathLike)):
            paths = sorted(str(p) for p in Path(paths).parent.glob(Path(paths).name)) or [paths]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataSourceError(f"ArrayRecord shard(s) missing: {missing[:3]}")
        self.paths = [str(p) for p in paths]
        self.name = name
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        try:
            rec = records.decode(self._source[index])
        except records.RecordError as e:
            return Skipped("malformed_record", f"{self.name}:{index}", str(e))
        rec.setdefault("source", self.name)
        return rec


class TfdsCaptionSource:
    """A TFDS captions dataset (e.g. `coco_captions`) as one-caption conversations.

    `data` is anything random-access with TFDS's element form (what `tfds.data_source`
    returns); `from_tfds` opens a locally prepared dataset (no download).
    """

    def __init__(self, data, name: str = "tfds", prompt: str = "<image>\n"):
        self.data, self.name, self.prompt = data, name, prompt

    @classmethod
    def from_tfds(cls, dataset: str = "coco_captions", split: str = "train",
                  data_dir: str | None = None):
        import tensorflow_datasets as tfds  # start-up cost (TFDS sources only)

        return cls(tfds.data_source(dataset, split=split, data_dir=data_dir, download=False),
                   name=dataset)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        ex = self.data[index]
        captions = ex.get("captions", {}).get("text", [])
        if isinstance(captions, np.ndarray):
            captions = captions.tolist()
        captions = [c.decode() if isinstance(c, bytes) else str(c) for c in captions]
        sample_id = f"{self.name}:{_scalar(ex.get('image/id', index))}"
        if not captions:
            return Skipped("empty_reply", sample_id, "no caption")
        caption = captions[index % len(captions)]  # deterministic choice per element
        return {"id": sample_id, "images": [np.asarray(ex["image"])], "source": self.name,
                "conversations": [{"from": "human", "value": self.prompt},
                                  {"from": "gpt", "value": caption}]}


def _scalar(x):
    return x.item() if hasattr(x, "item") else x
