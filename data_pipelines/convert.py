"""Convert a downloaded public dataset into shards the mmjax Grain pipeline reads.

    python -m data_pipelines.convert KIND [inputs] --out DIR [--image-root ROOT] [options]
    python -m data_pipelines.convert KIND --help

KIND: lcs558k, sharegpt4v, llava_instruct (158K and llava_v1_5_mix665k), coco_captions,
tfds_coco, webdataset, parquet, vqav2, gqa, chartqa, multiple_choice.

Output (see data_pipelines.core): DIR/NAME-00000.arrayrecord ... (or .jsonl with
--output llava_jsonl), index.jsonl, manifest.json, and a report (report.md, report.json,
report_lengths.png). Rerunning the same command resumes an interrupted build.
`--runner direct|DataflowRunner|FlinkRunner|SparkRunner [Beam options]` builds the same
records on Apache Beam (data_pipelines.beam_build). Train on it:
    --config.data.sources="[{'kind': 'arrayrecord', 'path': 'DIR/*.arrayrecord'}]"
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

from data_pipelines import adapt, beam_build, converters, storage
from data_pipelines.core import BuildConfig, BuildError, Part, build, local_output
from data_pipelines.report import write_report
from mmjax.data.sources import LlavaJsonSource


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", help="shard name prefix (default: the kind)")
    p.add_argument("--image-root", help="directory the records' image paths are relative to")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--output", choices=("arrayrecord", "llava_jsonl"), default="arrayrecord")
    p.add_argument("--max-side", type=int, default=0,
                   help="re-encode images whose longer side exceeds this (JPEG)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    p.add_argument("--limit", type=int, default=0, help="only the first N input samples")
    p.add_argument("--fetch-urls", action="store_true",
                   help="fetch images given as http(s) URLs (else they count as missing)")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per attempt")
    p.add_argument("--fetch-retries", type=int, default=2,
                   help="more attempts after a timeout, a lost connection, a 429 or 5xx")
    p.add_argument("--duplicate-images", choices=("keep", "drop"), default="keep",
                   help="a sample whose images are byte for byte an earlier sample's: kept and "
                   "reported (keep), or skipped as duplicate_image (drop)")
    p.add_argument("--tokenizer", help="tokenizer dir for the report's token lengths")
    p.add_argument("--template", default="vicuna_v1",
                   help="template the report's token lengths are counted with")
    p.add_argument("--image-tokens", type=int, default=576,
                   help="LLM tokens per image for the report (576: CLIP-L/336)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--runner", default=None, help="build on Apache Beam: direct (this "
                   "machine), DataflowRunner, FlinkRunner, SparkRunner; the options after it "
                   "are Beam's (--direct_num_workers 2 --direct_running_mode "
                   "multi_processing, --project, --region, --temp_location, ...). Default: "
                   "in process")


def _merge_args(p) -> None:
    p.add_argument("--prompt", default=adapt.SHORT_ANSWER_PROMPT,
                   help="format prompt appended to each question ('' for none)")
    p.add_argument("--max-turns", type=int, default=0, help="questions per conversation")
    p.add_argument("--max-tokens", type=int, default=0, help="approx. tokens per conversation")
    p.add_argument("--seed", type=int, default=0, help="question shuffling within an image")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m data_pipelines.convert",
                                  description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="kind", required=True)

    for kind, what in (("lcs558k", "LCS-558K blip_laion_cc_sbu_558k.json"),
                       ("sharegpt4v", "ShareGPT4V caption JSON (LLaVA form)"),
                       ("llava_instruct", "LLaVA-Instruct-158K or llava_v1_5_mix665k JSON")):
        p = sub.add_parser(kind, help=what, description=f"{what}: validated pass-through.")
        p.add_argument("json", help="the JSON (or JSONL) file")
        _common(p)

    p = sub.add_parser("coco_captions", help="COCO captions_*.json + images")
    p.add_argument("annotations")
    p.add_argument("--image-dir", default="", help="folder of the images under --image-root")
    p.add_argument("--all-captions", action="store_true", help="one sample per caption")
    _common(p)

    p = sub.add_parser("tfds_coco", help="a locally prepared TFDS captions dataset")
    p.add_argument("--dataset", default="coco_captions")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir")
    _common(p)

    p = sub.add_parser("webdataset", help="image-text WebDataset tar shards (img2dataset)")
    p.add_argument("tars", nargs="+")
    _common(p)

    p = sub.add_parser("parquet", help="img2dataset parquet output, or url + caption tables")
    p.add_argument("files", nargs="+")
    p.add_argument("--image-column", default="jpg")
    p.add_argument("--url-column", default="url")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--key-column", default="key")
    _common(p)

    p = sub.add_parser("vqav2", help="VQAv2 questions + annotations JSON")
    p.add_argument("questions")
    p.add_argument("annotations")
    p.add_argument("--image-pattern", default="train2014/COCO_train2014_{image_id:012d}.jpg")
    _merge_args(p)
    _common(p)

    p = sub.add_parser("gqa", help="GQA questions JSON ({qid: {imageId, question, answer}})")
    p.add_argument("questions")
    p.add_argument("--image-pattern", default="images/{image_id}.jpg")
    _merge_args(p)
    _common(p)

    p = sub.add_parser("chartqa", help="ChartQA JSON ([{imgname, query, label}])")
    p.add_argument("json")
    p.add_argument("--image-dir", default="png")
    _merge_args(p)
    _common(p)

    p = sub.add_parser("multiple_choice", help="ScienceQA / A-OKVQA style multiple choice")
    p.add_argument("json")
    p.add_argument("--image-dir", default="")
    p.add_argument("--prompt", default=adapt.MULTIPLE_CHOICE_PROMPT)
    _common(p)
    return top


def units(args, part: int = 50_000) -> list[Part]:
    """The input as parts that read on their own, in order: a LLaVA JSON in ranges of `part`
    records (each yields exactly its range's count), WebDataset one tar each, the annotation
    files (merged per image) whole. Chained, they are the in-process build's input; Beam
    reads them in parallel."""
    k = args.kind
    name = args.name or k
    if k in ("lcs558k", "sharegpt4v", "llava_instruct"):
        n = len(LlavaJsonSource(args.json, name=name))
        return [Part(functools.partial(converters.llava_json, args.json, name, a, a + part),
                     min(n, a + part) - a) for a in range(0, max(n, 1), part)]
    if k == "parquet":
        # sizes counted by reading: a damaged row group yields fewer rows than the footer says
        return [Part(functools.partial(converters.parquet, [f], name, args.image_column,
                                       args.url_column, args.caption_column, args.key_column))
                for f in sorted(map(str, args.files))]
    return [Part(read) for read in _readers(args, name)]


def _readers(args, name: str) -> list[functools.partial]:
    k = args.kind
    if k == "coco_captions":
        return [functools.partial(converters.coco_captions, args.annotations, args.image_dir,
                                  args.all_captions, name)]
    if k == "tfds_coco":
        return [functools.partial(converters.tfds_coco, args.dataset, args.split,
                                  args.data_dir, name)]
    if k == "webdataset":
        return [functools.partial(converters.webdataset, [t], name)
                for t in sorted(str(t) for t in args.tars)]
    merge = dict(prompt=args.prompt, max_turns=args.max_turns, max_tokens=args.max_tokens,
                 seed=args.seed, source=name) if k in ("vqav2", "gqa", "chartqa") else {}
    if k == "vqav2":
        return [functools.partial(converters.vqav2, args.questions, args.annotations,
                                  args.image_pattern, **merge)]
    if k == "gqa":
        return [functools.partial(converters.gqa, args.questions, args.image_pattern, **merge)]
    if k == "chartqa":
        return [functools.partial(converters.chartqa, args.json, args.image_dir, **merge)]
    if k == "multiple_choice":
        return [functools.partial(converters.multiple_choice, args.json, args.image_dir,
                                  args.prompt, name)]
    raise ValueError(k)


def samples(args):
    """Every sample, in order (the parts chained)."""
    return itertools.chain.from_iterable(unit.read() for unit in units(args))


def main(argv=None) -> dict:
    args, beam_args = parser().parse_known_args(argv)
    if beam_args and not args.runner:
        parser().error(f"unrecognized arguments: {' '.join(beam_args)}")
    if args.kind not in ("webdataset", "tfds_coco", "parquet") and not args.image_root:
        print("note: no --image-root; records with images will be counted as missing_image",
              file=sys.stderr)
    remote = args.runner and storage.is_url(args.out)  # a Beam build writes to URLs too
    root = args.image_root
    cfg = BuildConfig(name=args.name or args.kind,
                      out=args.out if remote else local_output(args.out),
                      image_root=(root if storage.is_url(root) else Path(root)) if root else None,
                      shard_size=args.shard_size, output=args.output, max_side=args.max_side,
                      quality=args.quality, reencode=args.reencode, limit=args.limit,
                      duplicate_images=args.duplicate_images, fetch_urls=args.fetch_urls,
                      fetch_timeout=args.fetch_timeout, fetch_retries=args.fetch_retries)
    if args.runner:
        manifest = beam_build.run(units(args), cfg, beam_build.runner_args(args.runner,
                                                                            beam_args))
    else:
        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            progress = lambda it: tqdm(it, desc=cfg.name, unit=" samples")  # noqa: E731
        manifest = build(samples(args), cfg, progress)
    if remote:  # the report reads the shards: on a local copy (python -m data_pipelines.report)
        print(summary(manifest, {"path": "not written (the output is not local)"}))
        return manifest
    report = write_report(cfg.out, args.tokenizer, args.image_tokens, args.template)
    print(summary(manifest, report))
    return manifest


def summary(manifest: dict, report: dict) -> str:
    lines = [f"{manifest['name']}: {manifest['samples']} samples written from "
             f"{manifest['inputs']} inputs into {len(manifest['shards'])} shard(s)"]
    skipped = manifest["skipped"]
    if skipped:
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
        for reason, examples in sorted(manifest["skipped_examples"].items()):
            lines.append(f"  {reason}: e.g. {examples[0]}")
    else:
        lines.append("skipped: none")
    dup = manifest.get("duplicate_images") or {}
    if dup.get("count"):
        how = "dropped" if dup["mode"] == "drop" else "kept (--duplicate-images drop skips them)"
        lines.append(f"duplicate images: {dup['count']} sample(s) {how}, e.g. "
                     f"{dup['examples'][0]}")
    lines.append(f"report: {report['path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
