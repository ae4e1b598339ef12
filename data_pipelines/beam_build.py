"""The converters on Apache Beam: the in-process build's records (`core.build`), made by many
workers on any runner Beam has (DirectRunner on one machine, Dataflow, Flink, Spark).

    python -m data_pipelines.convert KIND ... --out DIR --runner direct \
        [--direct_num_workers 2 --direct_running_mode multi_processing]
    python -m data_pipelines.convert KIND ... --out DIR --runner DataflowRunner \
        --project P --region R --temp_location gs://BUCKET/tmp [other Beam options]

The stages (positions are the in-process build's input numbering):
  position  each part's offset: the samples of the parts before it (`convert.units`: ranges
            of a LLaVA JSON, whose sizes are known; one tar each, counted by a pass that
            decodes nothing; annotation files whole, one part), a side input;
  read      the parts spread over the workers, each read in order, its samples numbered
            from its offset (the in-process build's positions);
  check     `core.read_sample` (the conversation checks, image decode, optional re-encode),
            in parallel (an input of fewer than 8 parts has its samples spread over the
            workers first; more parts are spread as parts); a bad sample is a skip: the Beam
            counter `skipped/REASON`, and in the manifest by reason with the first examples
            by position;
  ids       positions grouped by input id: the first written one keeps the id, each repeat
            is ID#POSITION, as the in-process build names them; an input id that equals such
            a name stops the build (the in-process build resolves it in input order);
  write     names and records joined by shard (input position // shard_size: the images
            cross the network once), each shard in position order, written under a
            temporary name and renamed: a rerun or a retried bundle writes the same bytes
            under the same name, nothing twice;
  finish    index.jsonl (shard by shard), manifest.json (the in-process build's fields and
            the runner); shards and temporary files a killed earlier run left are removed.

A shard holds the records of one range of input positions, so it may hold fewer than
shard_size (the in-process build fills each one): the same records, byte for byte, in other
files. Inputs are local paths (or mounted buckets); the output is a local directory.
`apache-beam` is the beam extra: pip install 'mmjax[beam]'.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from data_pipelines.core import (
    BuildConfig,
    BuildError,
    Part,
    encode_sample,
    local_output,
    read_sample,
    settings_of,
)
from mmjax.data import records
from mmjax.data.quality import EXAMPLES_PER_REASON, Skipped

PARTS = ".beam-parts"  # per-shard index lines until the finish step joins them
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
    out = local_output(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(cfg)
    if (out / "progress.json").exists():
        raise BuildError(f"{out} holds an in-process build; use a new output directory")
    old = out / "manifest.json"
    if old.exists() and json.loads(old.read_text()).get("settings") != settings:
        raise BuildError(f"{out} holds a build with other settings; use a new output "
                         "directory or delete it")
    old.unlink(missing_ok=True)  # complete again only when this run finishes
    (out / "id_clashes.json").unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    limit = cfg.limit
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its progress chatter
    opts = PipelineOptions(pipeline_args)
    with beam.Pipeline(options=opts) as p:
        parts = (p | "parts" >> beam.Create(list(enumerate(units)))
                 | "spread parts" >> beam.Reshuffle())
        last = len(units) - 1  # the parts before a part give its offset: the last one's
        # size is never needed, a known size is not counted
        offsets = (parts | "sizes" >> beam.Map(_size, last)
                   | "all sizes" >> beam.combiners.ToDict()
                   | "offsets" >> beam.Map(_offsets))
        # read after the offsets are known: a part's samples go from its read to their
        # checks on one worker, never through the runner
        positioned = parts | "read" >> beam.FlatMap(_read_part,
                                                    beam.pvalue.AsSingleton(offsets))
        if limit:
            positioned = positioned | "limit" >> beam.Filter(lambda x: x[0] < limit)
        if len(units) < SPREAD_BELOW:  # few parts: spread their samples over the workers
            positioned = positioned | "spread samples" >> beam.Reshuffle()
        checked = positioned | "check" >> beam.Map(_check, cfg)
        skips = checked | "skips" >> beam.Filter(lambda x: x[0] == "skip")
        good = checked | "good" >> beam.Filter(lambda x: x[0] == "ok")
        by_id = (good | "by id" >> beam.Map(lambda x: (x[2].id, x[1]))
                 | "group ids" >> beam.GroupByKey())
        named = by_id | "name" >> beam.FlatMap(_name)  # (position, output id, input id)
        renamed = (named | "renamed" >> beam.Filter(lambda r: r[1] != r[2])
                   | "renamed ids" >> beam.Map(lambda r: (r[1], "renamed")))
        ids = by_id | "input ids" >> beam.Map(lambda kv: (kv[0], "input"))
        clashes = ((renamed, ids) | "all ids" >> beam.Flatten()
                   | "group all ids" >> beam.GroupByKey()
                   | "clash" >> beam.Filter(lambda kv: len(set(kv[1])) > 1)
                   | "clash ids" >> beam.Map(lambda kv: kv[0])
                   | "clash list" >> beam.combiners.Top.Smallest(EXAMPLES_PER_REASON))
        size = cfg.shard_size
        # the names (small) and the records (images) meet per shard: one shuffle of images
        shards = ({"names": named | "names by shard" >> beam.Map(lambda r: (r[0] // size, r)),
                   "records": good | "by shard" >> beam.Map(lambda x: (x[1] // size, x[1:]))}
                  | "group shards" >> beam.CoGroupByKey()
                  | "write" >> beam.Map(_write_shard, cfg))
        inputs = positioned | "inputs" >> beam.combiners.Count.Globally()
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
             beam.pvalue.AsSingleton(clashes)))
    clash = out / "id_clashes.json"
    if clash.exists():
        raise BuildError(f"input ids equal the names this build gives repeated ids "
                         f"(ID#POSITION): {json.loads(clash.read_text())}; build these inputs "
                         "in process (it names them in input order)")
    return json.loads((out / "manifest.json").read_text())


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


def _read_part(part, offsets: dict):
    """(index, Part) -> (input position, sample) for each of its samples."""
    index, unit = part
    for n, sample in enumerate(unit.read()):
        yield offsets[index] + n, sample
    _counter("parts").inc()


def _check(item, cfg: BuildConfig):
    """(position, sample) -> ('skip', position, Skipped) or ('ok', position, sample, images,
    sizes); the sample keeps its image paths, not the bytes it was read with."""
    position, sample = item
    _counter("inputs").inc()
    got = read_sample(sample, cfg)
    if isinstance(got, Skipped):
        _counter(f"skipped/{got.reason}").inc()
        return "skip", position, got
    light = dataclasses.replace(sample, images=[p if isinstance(p, str) else None
                                                for p in sample.images])
    return ("ok", position, light, *got)


def _name(kv):
    """The written positions of one input id -> (position, output id, input id): the first
    position keeps the id, the others are ID#POSITION."""
    source_id, positions = kv
    for k, position in enumerate(sorted(positions)):
        yield position, source_id if k == 0 else f"{source_id}#{position}", source_id


def _write_shard(kv, cfg: BuildConfig):
    """(shard number, {names, records}) -> the shard written in position order (temporary
    name, then renamed) and its index lines set aside; returns (number, file, records)."""
    k, joined = kv
    names = {position: out_id for position, out_id, _ in joined["names"]}
    group = sorted(joined["records"], key=lambda r: r[0])
    out = Path(cfg.out)
    name = f"{cfg.name}-{k:05d}.arrayrecord"
    tmp = out / f"{name}.tmp-{uuid.uuid4().hex}"
    records.write_shard(tmp, [encode_sample(names[pos], sample, images, sizes, cfg)
                              for pos, sample, images, sizes in group])
    os.replace(tmp, out / name)
    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    lines = "".join(json.dumps({"id": names[pos], "source_id": sample.id, "shard": name,
                                "position": i}) + "\n"
                    for i, (pos, sample, _, _) in enumerate(group))
    tmp = parts / f"{k:08d}.jsonl.tmp-{uuid.uuid4().hex}"
    tmp.write_text(lines)
    os.replace(tmp, parts / f"{k:08d}.jsonl")
    _counter("written").inc(len(group))
    return k, name, len(group)


def _finish(_, cfg: BuildConfig, settings: dict, runner: str, shards, inputs: int,
            counts: dict, examples: dict, clashes: list) -> None:
    out = Path(cfg.out)
    if clashes:
        (out / "id_clashes.json").write_text(json.dumps(sorted(clashes)))
        return
    shards = sorted(shards)
    names = {name for _, name, _ in shards}
    tmp = out / "index.jsonl.tmp"
    with open(tmp, "w") as f:
        for k, _, _ in shards:
            f.write((out / PARTS / f"{k:08d}.jsonl").read_text())
    os.replace(tmp, out / "index.jsonl")
    for stale in out.glob(f"{cfg.name}-*.arrayrecord*"):  # a killed run's leftovers
        if stale.name not in names:
            stale.unlink()
    shutil.rmtree(out / PARTS, ignore_errors=True)
    manifest = {"name": cfg.name, "settings": settings, "shards": [n for _, n, _ in shards],
                "samples": sum(n for _, _, n in shards), "inputs": inputs,
                "skipped": dict(sorted(counts.items())),
                "skipped_examples": {r: [text for _, text in sorted(ex)]
                                     for r, ex in sorted(examples.items())},
                "output": cfg.output, "runner": runner}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
