"""An object store for tests: `fakestore://BUCKET/KEY` is the file $MMJAX_FAKE_STORE/BUCKET/KEY,
registered with Apache Beam's FileSystems under the scheme `fakestore` (as gs:// is with
apache-beam[gcp]) once this module is imported. Like GCS it has no directories: listing is
by key prefix. Used with the in-memory DirectRunner (one process)."""
from __future__ import annotations

import io
import os
import shutil

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "fakestore://"


def root() -> str:
    return os.environ.get("MMJAX_FAKE_STORE", "/tmp/mmjax-fake-store")


def local(url: str) -> str:
    assert url.startswith(SCHEME), url
    return os.path.join(root(), url[len(SCHEME):])


def _url(path: str) -> str:
    return SCHEME + os.path.relpath(path, root())


class FakeStore(LocalFileSystem):
    @classmethod
    def scheme(cls):
        return "fakestore"

    def has_dirs(self):
        return False

    def join(self, base, *paths):
        return "/".join([base.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def _list(self, prefix):
        for d, _, files in os.walk(root()):
            for name in files:
                url = _url(os.path.join(d, name))
                if url.startswith(prefix):
                    st = os.stat(os.path.join(d, name))
                    yield FileMetadata(url, st.st_size, st.st_mtime)

    def metadata(self, path):
        st = os.stat(local(path))
        return FileMetadata(path, st.st_size, st.st_mtime)

    def create(self, path, *args, **kwargs):
        os.makedirs(os.path.dirname(local(path)), exist_ok=True)
        return io.open(local(path), "wb")

    def open(self, path, *args, **kwargs):
        return io.open(local(path), "rb")

    def copy(self, sources, destinations):
        for s, d in zip(sources, destinations):
            os.makedirs(os.path.dirname(local(d)), exist_ok=True)
            shutil.copyfile(local(s), local(d))

    def rename(self, sources, destinations):
        for s, d in zip(sources, destinations):
            os.makedirs(os.path.dirname(local(d)), exist_ok=True)
            os.replace(local(s), local(d))

    def exists(self, path):
        return os.path.isfile(local(path))

    def size(self, path):
        return os.path.getsize(local(path))

    def last_updated(self, path):
        return os.path.getmtime(local(path))

    def checksum(self, path):
        return str(os.path.getsize(local(path)))

    def delete(self, paths):
        for p in paths:
            os.remove(local(p))
