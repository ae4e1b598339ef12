"""Generate LLaVA-Instruct-style data from captions and boxes with any OpenAI-compatible
chat-completions endpoint.

    python -m data_pipelines.self_instruct --captions captions_train2017.json \
        --instances instances_train2017.json --kinds conversation,detail,complex_reasoning \
        --base-url http://127.0.0.1:8000/v1 --model my-model --out runs/si
    # or contexts of your own, one JSON object per line:
    #   {"image_id": ..., "file_name": ..., "width": W, "height": H, "captions": [...],
    #    "objects": [{"name": "dog", "box": "X Y Width Height"}, ...]}
    python -m data_pipelines.self_instruct --contexts contexts.jsonl ...

The API key is read from the environment variable named by --api-key-env (default
OPENAI_API_KEY) and never logged. Rerun the same command to resume; OUT/llava.json is
ready for `--config.data.sources` (kind llava_json, image_root = the images' folder) or for
`python -m data_pipelines.convert llava_instruct`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_pipelines.beam_build import runner_args
from data_pipelines.self_instruct.client import ClientConfig
from data_pipelines.self_instruct.generate import make_jobs, run, run_beam
from data_pipelines.self_instruct.prompts import KINDS, coco_contexts, parse_xywh_text


def load_contexts(args) -> list[dict]:
    if args.contexts:
        out = []
        for n, line in enumerate(Path(args.contexts).read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            objs = [(o["name"], [float(v) for v in (o["box"] if isinstance(o["box"], list)
                                                    else parse_xywh_text(o["box"]))])
                    for o in rec.get("objects", [])]
            out.append({"image_id": rec.get("image_id", n), "file_name": rec["file_name"],
                        "width": rec["width"], "height": rec["height"],
                        "captions": rec.get("captions", []), "objects": objs})
        return out
    caps = json.loads(Path(args.captions).read_text())
    inst = json.loads(Path(args.instances).read_text()) if args.instances else None
    return coco_contexts(caps, inst)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.self_instruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="COCO captions JSON")
    src.add_argument("--contexts", help="JSONL of contexts (see above)")
    p.add_argument("--instances", help="COCO instances JSON (boxes)")
    p.add_argument("--kinds", default="conversation,detail,complex_reasoning",
                   help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--prompt-dir", help="folder with your own KIND.txt prompt files")
    p.add_argument("--n-instructions", type=int, default=5, help="multitask: items per image")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a stop string the endpoint cuts replies at (repeatable): for local "
                   "models (python -m mmjax.serve) that do not end their turn on their own")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait (s), doubling")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--runner", default=None, help="ask from Apache Beam's workers: direct, "
                   "FlinkRunner, SparkRunner, DataflowRunner; the options after it are Beam's "
                   "(--direct_num_workers 4 ...); --concurrency is then per worker")
    args, beam_args = p.parse_known_args(argv)
    if beam_args and not args.runner:
        p.error(f"unrecognized arguments: {' '.join(beam_args)}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown and not args.prompt_dir:
        p.error(f"unknown kinds {sorted(unknown)}")
    contexts = load_contexts(args)
    if args.limit:
        contexts = contexts[:args.limit]
    jobs = make_jobs(contexts, kinds, args.prompt_dir, args.n_instructions)
    cfg = ClientConfig(args.base_url, args.model, args.api_key_env, args.temperature,
                       args.max_tokens, args.timeout, args.max_retries, args.backoff,
                       stop=tuple(args.stop))
    if args.runner:
        summary = run_beam(jobs, cfg, Path(args.out), args.concurrency,
                           runner_args(args.runner, beam_args))
    else:
        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            progress = lambda it, total: tqdm(it, total=total, desc="requests")  # noqa: E731
        summary = run(jobs, cfg, Path(args.out), args.concurrency, progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=1))
    if summary.get("failed"):
        print(f"{summary['failed']} job(s) failed after retries (rerun to try them again): "
              f"{summary['failures'][:3]}")
    return summary


if __name__ == "__main__":
    main()
