"""One reply from a trained or imported LLaVA.

    python -m mmjax.generate (--hf DIR | --checkpoint WORKDIR[:STEP]) [--image PATH ...]
        [--video PATH ... [--frames N] [--video-fps F]]
        --prompt TEXT [--template NAME|raw] [--max-new-tokens N] [--temperature T]
        [--top-p P] [--top-k K] [--seed S] [--dtype float32|bfloat16] [--output text|json]
"""
from __future__ import annotations

import argparse
import json

from mmjax.inference import cli
from mmjax.inference.prompt import request


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mmjax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image (repeatable; in prompt order)")
    cli.add_video_args(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default=None, help="system prompt (default: the "
                        "template's)")
    cli.add_sampling_args(parser)
    parser.add_argument("--logprobs", action="store_true", help="with --output json")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    sampling = cli.sampling(args, logprobs=args.logprobs)
    m = cli.load_model(args)
    images = [m.read_image(p) for p in args.image]
    videos = [m.read_video(p, args.frames, args.video_fps) for p in args.video]
    req = request(m, [(args.prompt, "")], images, args.system, videos)
    result = m.engine(cli.say_compiling).generate([req], sampling, seed=args.seed)[0]
    out = {"text": result.text.strip(), "token_ids": result.token_ids,
           "finish": result.finish}
    if args.logprobs:
        out["logprobs"] = result.logprobs
    print(json.dumps(out) if args.output == "json" else out["text"], flush=True)
    return out


if __name__ == "__main__":
    cli.run_main(main)
