"""Reading a local Hugging Face checkpoint directory, one tensor at a time.

A directory as `huggingface-cli download` leaves it: config.json, `*.safetensors` with or
without `model.safetensors.index.json`, tokenizer files. Safetensors files are parsed here
(an 8-byte header length, a JSON header, raw little-endian data), so a tensor is read straight
into one numpy buffer with no framework in between, bf16 included (as `ml_dtypes.bfloat16`).
Pickle checkpoints (`.bin`, `.pt`) are refused unless the caller opts in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor that cannot be imported (names the culprit)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


CONVERT_HINT = (
    "Convert it to safetensors first, for example:\n"
    "  python -c \"import transformers; transformers.{arch}.from_pretrained('{dir}')"
    ".save_pretrained('{dir}-safetensors')\"\n"
    "(this unpickles the file: do it only for checkpoints you trust), or pass "
    "allow_pickle=True / --allow-pickle to load it here."
)


class Checkpoint:
    """Index of every tensor in a checkpoint directory; `read(key)` returns one numpy array."""

    def __init__(self, directory: str | os.PathLike, allow_pickle: bool = False):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist")
        self.config_path = self.dir / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path} is missing: not a Hugging Face model dir")
        self._pickled: dict[str, object] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        files = self._safetensors_files()
        if files:
            for f in files:
                self.tensors.update(_read_header(f))
            self._check_index()
        else:
            pickles = sorted(p for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if not pickles:
                raise CheckpointError(f"no *.safetensors weight files in {self.dir}")
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.dir} holds only pickle weights ({', '.join(p.name for p in pickles)}), "
                    "which can run arbitrary code when loaded and are refused by default.\n"
                    + CONVERT_HINT.format(dir=self.dir, arch=self._arch_name()))
            self._load_pickles(pickles)

    def _arch_name(self) -> str:
        try:
            return (self.config().get("architectures") or ["AutoModel"])[0]
        except CheckpointError:
            return "AutoModel"

    def config(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config_path} is not valid JSON: {e}") from e

    def keys(self) -> list[str]:
        return sorted(self._pickled if self._pickled is not None else self.tensors)

    def has(self, key: str) -> bool:
        return key in (self._pickled if self._pickled is not None else self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        return self.tensors[key].shape

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a fresh numpy array in its stored dtype."""
        if self._pickled is not None:
            t = self._pickled[key]
            return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
        info = self.tensors[key]
        count = int(np.prod(info.shape, dtype=np.int64))
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = np.fromfile(f, dtype=info.dtype, count=count)
        if data.size != count:
            raise CheckpointError(f"{info.file.name}: tensor {key!r} is truncated "
                                  f"({data.size} of {count} elements)")
        return data.reshape(info.shape)

    def _safetensors_files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            names = sorted(set(weight_map.values()))
            for name in names:
                if not (self.dir / name).is_file():
                    raise CheckpointError(
                        f"{index.name} lists {name}, which is missing in {self.dir}")
            self._weight_map = weight_map
            return [self.dir / n for n in names]
        self._weight_map = None
        return sorted(self.dir.glob("*.safetensors"))

    def _check_index(self) -> None:
        if self._weight_map is None:
            return
        for key, name in self._weight_map.items():
            info = self.tensors.get(key)
            if info is None or info.file.name != name:
                raise CheckpointError(f"{INDEX_FILE} puts tensor {key!r} in {name}, "
                                      "but that file does not hold it")

    def _load_pickles(self, files: list[Path]) -> None:
        try:
            import torch  # optional extra (test): pickle checkpoints only
        except ImportError as e:
            raise CheckpointError("loading pickle checkpoints needs torch installed") from e
        self._pickled = {}
        for f in files:
            # weights_only=True still refuses arbitrary objects: plain tensors only.
            self._pickled.update(torch.load(f, map_location="cpu", weights_only=True))


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path} is not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[meta["dtype"]])
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {key!r} has an unsupported or missing "
                                  f"field {e}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} has inconsistent offsets or is "
                                  "truncated")
        out[key] = TensorInfo(path, dtype, shape, base + begin, nbytes)
    return out
