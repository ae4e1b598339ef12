"""The ArrayRecord sample format: one record = one sample with its image bytes embedded.

    b"MMJX1" | u32 header length | JSON header | image 0 bytes | image 1 bytes | ...
        [| video bytes]

The header holds `id`, `conversations` (LLaVA form), `source` and `image_sizes` (bytes per
image, in order), and for a LLaVA-OneVision video sample `video_size` (its file's bytes come
last). `data_pipelines/` writes these; `sources.ArrayRecordSource` reads them.
"""
from __future__ import annotations

import json
import struct

MAGIC = b"MMJX1"


class RecordError(ValueError):
    pass


def encode(sample_id: str, conversations: list[dict], images: list[bytes] = (),
           source: str = "", extra: dict | None = None, video: bytes | None = None) -> bytes:
    header = {"id": sample_id, "conversations": conversations, "source": source,
              "image_sizes": [len(b) for b in images], **(extra or {})}
    if video is not None:
        header["video_size"] = len(video)
    raw = json.dumps(header, ensure_ascii=False).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + b"".join(images) + (video or b"")


def decode(record: bytes) -> dict:
    """-> {"id", "conversations", "source", "images": [bytes, ...], ...extra} (and "video":
    bytes for a video sample)."""
    if not record.startswith(MAGIC) or len(record) < len(MAGIC) + 4:
        raise RecordError("not an mmjax record")
    (n,) = struct.unpack_from("<I", record, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(record[start:start + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"corrupt record header: {e}") from None
    offset = start + n
    images = []
    for size in header.pop("image_sizes", []):
        images.append(record[offset:offset + size])
        offset += size
    if "video_size" in header:
        size = header.pop("video_size")
        header["video"] = record[offset:offset + size]
        offset += size
    if offset != len(record):
        raise RecordError(f"record length {len(record)} does not match its header ({offset})")
    header["images"] = images
    return header


def write_shard(path, encoded_records) -> int:
    """Writes encoded records to one ArrayRecord file; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter  # writers only

    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for rec in encoded_records:
            writer.write(rec)
            n += 1
    finally:
        writer.close()
    return n
