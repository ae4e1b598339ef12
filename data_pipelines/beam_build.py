"""The converters on Apache Beam: the in-process build's records (`core.build`), made by many
workers on a runner Beam has (DirectRunner on one machine; Flink or Spark on a cluster whose
workers share the paths).

    python -m data_pipelines.convert KIND ... --out DIR --runner direct \
        [--direct_num_workers 2 --direct_running_mode multi_processing]
    python -m data_pipelines.convert KIND ... --out /mnt/shared/DIR --runner FlinkRunner \
        --flink_master HOST:8081 [other Beam options]

The stages (positions are the in-process build's input numbering):
  offsets   each part's offset: the samples of the parts before it (`convert.units`: ranges
            of a LLaVA JSON, whose sizes are known; one tar each, counted by a pass that
            decodes nothing; annotation files whole, one part), a side input;
  build     the parts spread over the workers, each read in order, its samples numbered
            from its offset and cut into chunks of shard_size inputs; each chunk checked
            (`core.read_sample`: the conversation checks, image decode, optional re-encode)
            and its good records written, in position order, under their input ids to a
            temporary file. Many parts (tars: the images inside) are built where they are
            read; an input of fewer than 8 parts has its samples (paths) grouped by chunk
            over the workers first. Images never cross the network. A bad sample is a skip:
            the Beam counter `skipped/REASON`, and in the manifest by reason with the first
            examples by position;
  ids       the written positions grouped by input id: the first keeps the id, each repeat
            is ID#POSITION, as the in-process build names them; an input id that equals such
            a name stops the build (the in-process build resolves it in input order);
  write     each chunk renamed to its shard's final name (its repeats' records re-encoded
            under their new ids first): a rerun or a retried bundle writes the same bytes
            under the same name, nothing twice;
  finish    index.jsonl (shard by shard), manifest.json (the in-process build's fields and
            the runner); shards and temporary files a killed earlier run left are removed.

A shard holds the good records of one chunk (shard_size inputs of one part), so it may hold
fewer than shard_size (the in-process build fills each one): the same records, byte for
byte, in other files (NAME-PART-CHUNK.arrayrecord). Inputs and output are paths every worker
sees (local, NFS, gcsfuse). `apache-beam` is the beam extra: pip install 'mmjax[beam]'.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid

from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines import storage
from data_pipelines.core import (
    BuildConfig,
    BuildError,
    Part,
    encode_sample,
    images_sha256,
    read_sample,
    renamed,
    settings_of,
)
from mmjax.data import records
from mmjax.data.quality import EXAMPLES_PER_REASON, Skipped

PARTS = ".beam-parts"  # per-shard index lines until the finish step joins them
TMP = ".beam-tmp"  # chunks as built, before their final names
COUNTER = "mmjax.data_pipelines"
SPREAD_BELOW = 8  # inputs of fewer parts have their samples spread over the workers


def runner_args(runner: str, rest: list[str]) -> list[str]:
    """Beam's pipeline arguments: `direct` is the DirectRunner; workers log errors only
    unless told otherwise."""
    quiet = [] if any(a.startswith("--default_sdk_harness_log_level") for a in rest) else [
        "--default_sdk_harness_log_level=ERROR"]
    return ["--runner", "DirectRunner" if runner == "direct" else runner, *quiet, *rest]


def run(units: list[Part], cfg: BuildConfig, pipeline_args: list[str]) -> dict:
    """Builds `units` (the input's parts, in order) into `cfg.out` on the runner that
    `pipeline_args` name; returns the manifest."""
    # the beam extra, imported when a Beam build runs: the rest of data_pipelines needs none
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    if cfg.output != "arrayrecord":
        raise BuildError("a Beam build writes ArrayRecord shards (--output arrayrecord); "
                         "llava_jsonl output is built in process")
    out = str(cfg.out)
    if not storage.is_url(out):
        os.makedirs(out, exist_ok=True)
    settings = settings_of(cfg)
    if storage.exists(storage.join(out, "progress.json")):
        raise BuildError(f"{out} holds an in-process build; use a new output directory")
    old = storage.join(out, "manifest.json")
    if storage.exists(old) and json.loads(storage.text(old)).get("settings") != settings:
        raise BuildError(f"{out} holds a build with other settings; use a new output "
                         "directory or delete it")
    storage.delete(old)  # complete again only when this run finishes
    storage.delete(storage.join(out, "id_clashes.json"))
    for leftover in (PARTS, TMP):  # a killed run's
        storage.remove_tree(storage.join(out, leftover))
    limit = cfg.limit
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its progress chatter
    opts = PipelineOptions(pipeline_args)
    p = beam.Pipeline(options=opts)
    parts = (p | "parts" >> beam.Create(list(enumerate(units)))
             | "spread parts" >> beam.Reshuffle())
    last = len(units) - 1  # the parts before a part give its offset: the last one's
    # size is never needed, a known size is not counted
    offsets = beam.pvalue.AsSingleton(
        parts | "sizes" >> beam.Map(_size, last) | "all sizes" >> beam.combiners.ToDict()
        | "offsets" >> beam.Map(_offsets))
    if len(units) < SPREAD_BELOW:  # few parts: their samples (paths) spread by chunk
        size = cfg.shard_size
        built = (parts | "read" >> beam.FlatMap(_read_part, offsets, limit)
                 | "by chunk" >> beam.Map(lambda x: ((x[0], x[1] // size), (x[2], x[3])))
                 | "group chunks" >> beam.GroupByKey()
                 | "build chunks" >> beam.FlatMap(_build_chunk, cfg))
    else:  # many parts (tars: images inside): each read, checked and written in place
        built = parts | "read and build" >> beam.FlatMap(_read_and_build, offsets, limit,
                                                         cfg)
    skips = built | "skips" >> beam.Filter(lambda x: x[0] == "skip")
    chunks = built | "chunks" >> beam.Filter(lambda x: x[0] == "chunk")
    written = chunks | "written" >> beam.FlatMap(lambda c: c[3])  # (pos, id, digest)
    judged = ((written | "with images" >> beam.Filter(lambda w: w[2] is not None)
               | "by images" >> beam.Map(lambda w: (w[2], w[:2]))
               | "group images" >> beam.GroupByKey()
               | "duplicates" >> beam.FlatMap(_duplicates),
               written | "text only" >> beam.Filter(lambda w: w[2] is None)
               | "not judged" >> beam.Map(lambda w: (w[0], w[1], None)))
              | "judged" >> beam.Flatten())  # (position, input id, what it duplicates)
    duplicates = judged | "duplicated" >> beam.Filter(lambda j: j[2] is not None)
    drop = cfg.duplicate_images == "drop"
    if drop:  # not written: skips, and no name taken
        skips = (skips, duplicates | "duplicate skips" >> beam.Map(
            lambda j: ("skip", j[0], Skipped("duplicate_image", j[1], j[2]))
        )) | "all skips" >> beam.Flatten()
    by_id = (judged | "kept" >> beam.Filter(lambda j: not (drop and j[2] is not None))
             | "by id" >> beam.Map(lambda j: (j[1], j[0]))
             | "group ids" >> beam.GroupByKey())
    named = by_id | "name" >> beam.FlatMap(_name)  # (position, output id, input id)
    renamed = named | "renamed" >> beam.Filter(lambda r: r[1] != r[2])
    ids = by_id | "input ids" >> beam.Map(lambda kv: (kv[0], "input"))
    clashes = ((renamed | "renamed ids" >> beam.Map(lambda r: (r[1], "renamed")), ids)
               | "all ids" >> beam.Flatten()
               | "group all ids" >> beam.GroupByKey()
               | "clash" >> beam.Filter(lambda kv: len(set(kv[1])) > 1)
               | "clash ids" >> beam.Map(lambda kv: kv[0])
               | "clash list" >> beam.combiners.Top.Smallest(EXAMPLES_PER_REASON))
    dropped = (duplicates if drop else p | "none dropped" >> beam.Create([])) \
        | "dropped" >> beam.Map(lambda j: (j[0], True))
    shards = chunks | "write" >> beam.FlatMap(
        _write_chunk, cfg, beam.pvalue.AsDict(
            renamed | "by position" >> beam.Map(lambda r: (r[0], r[1]))),
        beam.pvalue.AsDict(dropped))
    dup_texts = duplicates | "duplicate texts" >> beam.Map(
        lambda j: (j[0], f"{j[1]} (input {j[0]}): {j[2]}"))
    dup_count = duplicates | "count duplicates" >> beam.combiners.Count.Globally()
    dup_examples = dup_texts | "duplicate examples" >> beam.combiners.Top.Smallest(
        EXAMPLES_PER_REASON)
    inputs = (chunks | "chunk inputs" >> beam.Map(lambda c: c[4])
              | "inputs" >> beam.CombineGlobally(sum))
    reasons = skips | "reason" >> beam.Map(
        lambda x: (x[2].reason, (x[1], f"{x[2].sample_id}: {x[2].detail}"[:300])))
    counts = reasons | "count skips" >> beam.combiners.Count.PerKey()
    examples = reasons | "examples" >> beam.combiners.Top.SmallestPerKey(
        EXAMPLES_PER_REASON)
    (p | "finish once" >> beam.Create([None])
     | "finish" >> beam.Map(
         _finish, cfg, settings, opts.get_all_options().get("runner") or "DirectRunner",
         beam.pvalue.AsList(shards), beam.pvalue.AsSingleton(inputs),
         beam.pvalue.AsDict(counts), beam.pvalue.AsDict(examples),
         beam.pvalue.AsSingleton(clashes), beam.pvalue.AsSingleton(dup_count),
         beam.pvalue.AsSingleton(dup_examples)))
    result = p.run()
    result.wait_until_finish()
    clash = storage.join(out, "id_clashes.json")
    if storage.exists(clash):
        raise BuildError(f"input ids equal the names this build gives repeated ids "
                         f"(ID#POSITION): {json.loads(storage.text(clash))}; build these "
                         "inputs in process (it names them in input order)")
    manifest_path = storage.join(out, "manifest.json")
    manifest = json.loads(storage.text(manifest_path))
    manifest["beam_counters"] = counters(result)
    storage.write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
    return manifest


def counters(result) -> dict[str, int]:
    """The job's counters (inputs, written, parts, skipped/REASON), as the runner reports
    them ({} from a runner that does not)."""
    from apache_beam.metrics.metric import MetricsFilter  # the beam extra

    try:
        found = result.metrics().query(MetricsFilter().with_namespace(COUNTER))["counters"]
    except (NotImplementedError, AttributeError, KeyError):
        return {}
    out: dict[str, int] = {}
    for m in found:
        value = m.committed if m.committed is not None else m.attempted
        out[m.key.metric.name] = out.get(m.key.metric.name, 0) + int(value or 0)
    return dict(sorted(out.items()))


def _counter(name: str):
    from apache_beam.metrics import Metrics  # the beam extra (workers run it)

    return Metrics.counter(COUNTER, name)


def _size(part, last: int):
    """(index, Part) -> (index, its sample count): known, not needed (the last part), or
    counted by reading it (no image is decoded)."""
    index, unit = part
    if unit.size is not None or index == last:
        return index, unit.size or 0
    return index, sum(1 for _ in unit.read())


def _offsets(sizes: dict) -> dict:
    """{part: samples} -> {part: samples of the parts before it}."""
    out, total = {}, 0
    for part in sorted(sizes):
        out[part], total = total, total + sizes[part]
    return out


def _read_part(part, offsets: dict, limit: int):
    """(index, Part) -> (part, place in part, input position, sample) for each sample below
    `limit` (0: all)."""
    index, unit = part
    for n, sample in enumerate(unit.read()):
        if limit and offsets[index] + n >= limit:
            break
        yield index, n, offsets[index] + n, sample
    _counter("parts").inc()


def _read_and_build(part, offsets: dict, limit: int, cfg: BuildConfig):
    """One part read and built chunk by chunk (shard_size samples each) on this worker."""
    index = part[0]
    chunk, c = [], 0
    for _, n, position, sample in _read_part(part, offsets, limit):
        if n // cfg.shard_size != c:
            yield from _build_chunk(((index, c), chunk), cfg)
            chunk, c = [], n // cfg.shard_size
        chunk.append((position, sample))
    if chunk:
        yield from _build_chunk(((index, c), chunk), cfg)


def _build_chunk(kv, cfg: BuildConfig):
    """((part, chunk), [(position, sample)]) -> a ('skip', position, Skipped) per bad sample,
    then ('chunk', key, temporary shard or None, [(position, input id, images' sha256)]
    written, inputs):
    the good samples checked, read and written in position order under their input ids
    (`_write_chunk` renames the repeats)."""
    key, samples = kv
    samples = sorted(samples, key=lambda x: x[0])
    good, written = [], []
    for position, sample in samples:
        _counter("inputs").inc()
        got = read_sample(sample, cfg)
        if isinstance(got, Skipped):
            _counter(f"skipped/{got.reason}").inc()
            yield "skip", position, got
            continue
        good.append(encode_sample(sample.id, sample, *got, cfg))
        written.append((position, sample.id, images_sha256(got[0])))
    tmp = None
    if good:
        tmp = storage.join(cfg.out, TMP, f"{key[0]:05d}-{key[1]:05d}-{uuid.uuid4().hex}")
        _write_shard(tmp, good)
    yield "chunk", key, tmp, written, len(samples)


def _write_shard(path: str, recs: list[bytes]) -> None:
    """An ArrayRecord file at `path` (written locally first when `path` is a URL)."""
    if storage.is_url(path):
        fd, local = tempfile.mkstemp(suffix=".arrayrecord")
        os.close(fd)
        records.write_shard(local, recs)
        storage.put(local, path)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        records.write_shard(path, recs)


def _read_shard(path: str) -> list[bytes]:
    local, fetched = path, storage.is_url(path)
    if fetched:
        fd, local = tempfile.mkstemp(suffix=".arrayrecord")
        os.close(fd)
        storage.get(path, local)
    try:
        reader = ArrayRecordReader(local)
        recs = reader.read_all()
        reader.close()
        return recs
    finally:
        if fetched:
            os.unlink(local)


def _duplicates(kv):
    """The written samples with one set of images -> (position, input id, what it
    duplicates: None for the first)."""
    _, group = kv
    group = sorted(group)
    first_position, first_id = group[0]
    yield first_position, first_id, None
    for position, source_id in group[1:]:
        yield position, source_id, f"the same image(s) as {first_id} (input {first_position})"


def _name(kv):
    """The written positions of one input id -> (position, output id, input id): the first
    position keeps the id, the others are ID#POSITION."""
    source_id, positions = kv
    for k, position in enumerate(sorted(positions)):
        yield position, source_id if k == 0 else f"{source_id}#{position}", source_id


def _write_chunk(chunk, cfg: BuildConfig, renames: dict, dropped: dict):
    """A built chunk -> its shard under its final name (records of repeated ids renamed,
    dropped duplicates left out; the others as built), its index lines set aside; yields
    (key, file, records)."""
    _, key, tmp, written, _ = chunk
    kept = [w for w in written if w[0] not in dropped]
    if len(kept) < len(written):
        _counter("skipped/duplicate_image").inc(len(written) - len(kept))
    if tmp is None or not kept:
        return
    out = str(cfg.out)
    name = f"{cfg.name}-{key[0]:05d}-{key[1]:05d}.arrayrecord"
    if storage.exists(tmp):  # (a retry after the rename found it gone: the shard is written)
        if len(kept) < len(written) or any(pos in renames for pos, _, _ in kept):
            recs = [renamed(r, renames[pos]) if pos in renames else r
                    for r, (pos, _, _) in zip(_read_shard(tmp), written) if pos not in dropped]
            again = f"{tmp}-final"
            _write_shard(again, recs)
            storage.delete(tmp)
            tmp = again
        storage.rename(tmp, storage.join(out, name))
    lines = "".join(json.dumps({"id": renames.get(pos, source_id), "source_id": source_id,
                                "shard": name, "position": i, "input": pos,
                                **({"images_sha256": digest} if digest else {})}) + "\n"
                    for i, (pos, source_id, digest) in enumerate(kept))
    storage.write_bytes(storage.join(out, PARTS, f"{key[0]:05d}-{key[1]:05d}.jsonl"),
                        lines.encode())
    _counter("written").inc(len(kept))
    yield key, name, len(kept)


def _finish(_, cfg: BuildConfig, settings: dict, runner: str, shards, inputs: int,
            counts: dict, examples: dict, clashes: list, dup_count: int,
            dup_examples: list) -> None:
    out = str(cfg.out)
    if clashes:
        storage.write_bytes(storage.join(out, "id_clashes.json"),
                            json.dumps(sorted(clashes)).encode())
        return
    shards = sorted(shards)
    names = {name for _, name, _ in shards}
    index = b"".join(storage.read_bytes(storage.join(out, PARTS, f"{part:05d}-{chunk:05d}.jsonl"))
                     for (part, chunk), _, _ in shards)
    storage.write_bytes(storage.join(out, "index.jsonl"), index)
    for stale in storage.listdir(out):  # a killed run's leftovers
        if stale.startswith(f"{cfg.name}-") and ".arrayrecord" in stale and stale not in names:
            storage.delete(storage.join(out, stale))
    storage.remove_tree(storage.join(out, PARTS))
    storage.remove_tree(storage.join(out, TMP))  # what failed attempts wrote
    manifest = {"name": cfg.name, "settings": settings, "shards": [n for _, n, _ in shards],
                "samples": sum(n for _, _, n in shards), "inputs": inputs,
                "skipped": dict(sorted(counts.items())),
                "skipped_examples": {r: [text for _, text in sorted(ex)]
                                     for r, ex in sorted(examples.items())},
                "output": cfg.output,
                "duplicate_images": {"mode": cfg.duplicate_images, "count": dup_count,
                                     "examples": [t for _, t in sorted(dup_examples)]},
                "runner": runner}
    storage.write_bytes(storage.join(out, "manifest.json"),
                        json.dumps(manifest, indent=2).encode())
