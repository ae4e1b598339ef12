"""Files by local path or by URL, for the Beam build and its inputs: a local path is a file;
a URL (gs://, s3://, hdfs://, ...) goes through Apache Beam's FileSystems (the beam extra,
plus the store's own: `pip install 'apache-beam[gcp]'` for gs://).

Objects appear whole when their writer closes, so `write_bytes` to a URL needs no temporary
name; a local file is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def is_url(path) -> bool:
    return "://" in str(path)


def _fs():
    # the beam extra, needed only for URLs
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _plain():
    from apache_beam.io.filesystem import CompressionTypes  # the beam extra

    return CompressionTypes.UNCOMPRESSED


def join(base, *names: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def exists(path) -> bool:
    return _fs().exists(str(path)) if is_url(path) else os.path.exists(path)


def open_read(path):
    """A binary file object (seekable for the stores Beam has)."""
    if is_url(path):
        return _fs().open(str(path), compression_type=_plain())
    return open(path, "rb")


def read_bytes(path) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    if is_url(path):
        with _fs().create(str(path), compression_type=_plain()) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def put(local_file, path) -> None:
    """A local file's bytes to `path` (moved when `path` is local too)."""
    if not is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_file, path)
        return
    with open(local_file, "rb") as src, _fs().create(str(path), compression_type=_plain()) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.unlink(local_file)


def get(path, local_file) -> None:
    with open_read(path) as src, open(local_file, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def rename(src, dst) -> None:
    if is_url(src):
        _fs().rename([str(src)], [str(dst)])
    else:
        os.replace(src, dst)


def delete(path) -> None:
    """Removes a file (a missing one is fine)."""
    if is_url(path):
        if _fs().exists(str(path)):
            _fs().delete([str(path)])
    else:
        Path(path).unlink(missing_ok=True)


def listdir(directory) -> list[str]:
    """The names of the files directly in `directory` (none if it does not exist)."""
    if is_url(directory):
        found = _fs().match([join(directory, "*")])[0].metadata_list
        return sorted(m.path.rsplit("/", 1)[-1] for m in found)
    return sorted(p.name for p in Path(directory).iterdir() if p.is_file()) \
        if os.path.isdir(directory) else []


def remove_tree(directory) -> None:
    """A flat directory and its files."""
    if is_url(directory):
        for name in listdir(directory):
            delete(join(directory, name))
    else:
        shutil.rmtree(directory, ignore_errors=True)


def text(path) -> str:
    return read_bytes(path).decode("utf-8")
