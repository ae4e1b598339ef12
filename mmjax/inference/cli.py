"""What the generation commands share: model and sampling options, and how they exit."""
from __future__ import annotations

import argparse
import sys

from mmjax import compile_cache
from mmjax.data.video import FRAMES
from mmjax.errors import ConfigError, UsageError
from mmjax.inference.load import Loaded, load
from mmjax.inference.sampling import Sampling
from mmjax.logs import quiet_notices


def add_model_args(parser: argparse.ArgumentParser, step: bool = True,
                   endpoint: bool = False) -> None:
    """--hf | --checkpoint (| --endpoint URL: a server answers, nothing loaded here)."""
    src = parser.add_mutually_exclusive_group(required=True)
    if endpoint:
        src.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server "
                         "(python -m mmjax.serve, http://HOST:PORT/v1) answers instead of a "
                         "model loaded here; --endpoint-model picks its model, the API key "
                         "is read from $MMJAX_API_KEY")
    src.add_argument("--hf", metavar="DIR", help="a local Hugging Face LLaVA directory "
                     "(LlavaForConditionalGeneration, with its tokenizer)")
    src.add_argument("--checkpoint", metavar="WORKDIR[:STEP]" if step else "WORKDIR",
                     help="a training work dir (newest checkpoint, or STEP)")
    parser.add_argument("--template", default="auto", help="conversation template: auto "
                        "(the run's; for --hf the tokenizer's chat template, else vicuna_v1), "
                        "plain, vicuna_v1, llama_3, chatml, chat_template, or raw (the prompt "
                        "text as given, each <image> expanded)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 on accelerators")
    parser.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                        help="the KV cache's element type (default: --dtype); bfloat16 "
                        "halves what each decode step reads of it")


def add_video_args(parser: argparse.ArgumentParser, paths: str = "many") -> None:
    """--video PATH (`paths`: many, one or none: the videos come from elsewhere) and how
    their frames are sampled (mmjax.data.video)."""
    if paths != "none":
        parser.add_argument("--video", action="append" if paths == "many" else "store",
                            default=[] if paths == "many" else None, metavar="PATH",
                            help="a video for a LLaVA-OneVision model (in prompt order, "
                            "<video> in a raw prompt); needs the video extra (PyAV)")
    parser.add_argument("--frames", type=int, default=FRAMES, help="at most this many frames "
                        "per video, spread evenly when there are more (OneVision: 32; capped "
                        "by the model's views per image slot)")
    parser.add_argument("--video-fps", type=float, default=1.0,
                        help="frames per second of video kept before the cap")


def add_sampling_args(parser: argparse.ArgumentParser, max_new: int = 512) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string (repeatable); EOS and end of turn always stop")
    parser.add_argument("--seed", type=int, default=0)


def sampling(args, logprobs: bool = False) -> Sampling:
    s = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop), logprobs=logprobs)
    try:
        s.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return s


def say_compiling(what: str) -> None:
    """What a command is compiling, on stderr (the first call of a shape takes seconds)."""
    print(f"compiling {what}", file=sys.stderr, flush=True)


def load_model(args) -> Loaded:
    m = load(args.hf, args.checkpoint, dtype=args.dtype, template=args.template)
    m.cache_dtype = getattr(args, "cache_dtype", None)
    return m


def run_main(main) -> None:
    """Runs a command's main: user mistakes as one line on stderr (exit 2). Compiled
    programs are kept on disk for the next process (`mmjax.compile_cache`)."""
    quiet_notices()
    compile_cache.enable()
    try:
        main()
    except (UsageError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
