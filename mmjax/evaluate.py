"""LLaVA-1.5's benchmark suite, answered with the KV-cache engine and scored offline.

    python -m mmjax.evaluate (--hf DIR | --checkpoint WORKDIR[:STEP]) --benchmark NAME
        --data DIR [--split S] [--variant V] [--image-root DIR] [--out DIR] [--limit N]
    python -m mmjax.evaluate (--hf DIR | --checkpoint WORKDIR) --benchmark all
        --data playground/data/eval      (every benchmark LLaVA's eval tree holds)
    python -m mmjax.evaluate --endpoint http://127.0.0.1:8000/v1 --benchmark NAME --data DIR
                                     (a running `mmjax.serve`, or any OpenAI-compatible server)
    python -m mmjax.evaluate --compare results_a.json results_b.json

Benchmarks: vqav2, gqa, textvqa, pope, scienceqa, mme, mmbench, chartqa, vizwiz, and
short_answer (any question file with reference answers: exact match per category) (file
layouts in `mmjax.evaluation.benchmarks` and the README). Questions are asked as LLaVA-1.5's
evaluation asked them (the model's template, vicuna_v1 for LLaVA-1.5; "Answer the question
using a single word or phrase." for short answers, "Answer with the option's letter from the
given choices directly." for multiple choice), greedy. --out (default
eval/BENCHMARK[-SPLIT]) gets:

    answers.jsonl      LLaVA's answer layout (question_id, prompt, text, answer_id, model_id,
                       metadata; MMBench adds round_id, options, option_char); resumable:
                       questions already answered there are not asked again
    results.json       every metric, skipped records by reason, the model, sha256 of every
                       data file read, the prompts used
    results.md         the same as a table
    *_submission.*     what the official servers take (VQAv2 test-dev, VizWiz, MMBench .xlsx;
                       GQA's predictions file)

Records that cannot be asked (missing image, malformed record, unreadable image) are skipped,
counted by reason, and reported; the metrics are over the answered questions.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmjax.errors import UsageError
from mmjax.evaluation import benchmarks as bench_lib
from mmjax.evaluation.endpoint import Endpoint, EndpointError
from mmjax.evaluation.runner import compare, markdown, run
from mmjax.inference import cli


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        if len(argv) != 3:
            raise UsageError("--compare takes two results.json files")
        for p in argv[1:]:
            if not Path(p).is_file():
                raise UsageError(f"{p} does not exist")
        print(compare(Path(argv[1]), Path(argv[2])), end="")
        return None
    parser = argparse.ArgumentParser(prog="python -m mmjax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, endpoint=True)
    parser.add_argument("--endpoint-model", default=None,
                        help="the model id to ask --endpoint for (default: the first listed)")
    parser.add_argument("--benchmark", required=True,
                        choices=sorted(bench_lib.BENCHMARKS) + ["all"],
                        help="all: every benchmark whose folder LLaVA's playground/data/eval "
                        "tree (--data) holds")
    parser.add_argument("--data", required=True, type=Path,
                        help="the benchmark's folder as released or as LLaVA's eval tree has "
                        "it, or the tree itself (MMBench: the TSV or its folder)")
    parser.add_argument("--split", default="", help="default: the one LLaVA-1.5 reports")
    parser.add_argument("--variant", default="", help="vqav2, vizwiz: official | llava "
                        "(LLaVA's route: EvalAI's processor first); textvqa: ocr | plain; "
                        "scienceqa: img | all; mmbench: circular | single")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="where the images are, if not where the release puts them")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=0, help="the first N questions only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--blank-images", action="store_true", help="every image replaced "
                        "by the tower's mean colour: how much of the score needs the image")
    args = parser.parse_args(argv)
    if args.endpoint and args.blank_images:
        raise UsageError("--blank-images needs the model here (--hf / --checkpoint)")
    if args.benchmark == "all":
        names = bench_lib.in_tree(args.data)
        if not names:
            raise UsageError(f"{args.data} holds none of LLaVA's evaluation folders (vqav2, gqa, "
                             "vizwiz, scienceqa, textvqa, pope, MME, mmbench)")
        m, engine = _model(args)  # one set of compiled programs for all
        return {name: _one(args, name, m, engine) for name in names}
    return _one(args, args.benchmark)


def _model(args):
    """(the loaded model, its engine), or (None, the endpoint) with --endpoint."""
    if args.endpoint:
        try:
            return None, Endpoint(args.endpoint, args.endpoint_model,
                                  os.environ.get("MMJAX_API_KEY"))
        except EndpointError as e:
            raise UsageError(str(e)) from None
    m = cli.load_model(args)
    return m, m.engine(cli.say_compiling)


def _one(args, name: str, m=None, engine=None) -> dict:
    """One benchmark: answers, scores, reports; printed as a table."""
    try:
        bench = bench_lib.get(name, args.data, args.image_root, args.split, args.variant)
    except bench_lib.BenchmarkError as e:
        raise UsageError(str(e)) from None
    default = Path("eval") / (bench.name + (f"-{bench.split}" if bench.split else ""))
    out = (args.out / default.name if args.benchmark == "all" else args.out) if args.out \
        else default
    if engine is None:
        m, engine = _model(args)
    try:
        report = run(m, bench, out, batch_size=args.batch_size, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, engine=engine,
                     model_source=args.hf or args.checkpoint, blank_images=args.blank_images)
    except (bench_lib.BenchmarkError, EndpointError) as e:
        raise UsageError(str(e)) from None
    print(markdown(report), end="")
    if report["skipped"]:
        print(f"\n{report['skipped']} record(s) skipped, not scored: "
              f"{bench.skips.describe()}")
    if not bench.scored:
        print(f"\n{bench.name} {bench.split} has no references here: answers and submission "
              f"files only ({', '.join(report['submission_files'])})")
    print(f"\nwritten to {out}/ (results.json, results.md, answers.jsonl"
          + "".join(f", {f}" for f in report["submission_files"]) + ")")
    return report


if __name__ == "__main__":
    cli.run_main(main)
