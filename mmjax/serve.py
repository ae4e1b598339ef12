"""Serve a trained or imported LLaVA: OpenAI's chat-completions API with continuous batching,
streaming, and a web chat page.

    python -m mmjax.serve (--hf DIR | --checkpoint WORKDIR[:STEP]) [--host 127.0.0.1]
        [--port 8000] [--slots 8] [--max-new-tokens 256] [--api-key KEY]
        [--allow-local-images DIR]

Then open http://HOST:PORT/ for the chat page, or point any OpenAI client at
http://HOST:PORT/v1 (README "Serving"). Needs the serve extra: pip install 'mmjax[serve]'.
SIGTERM (or Ctrl-C) stops taking requests, finishes the live ones, and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

import numpy as np

from mmjax.errors import UsageError
from mmjax.inference import cli
from mmjax.inference.engine import Request
from mmjax.inference.sampling import Sampling
from mmjax.inference.slots import OneAtATime, SlotEngine
from mmjax.serving.app import build_app
from mmjax.serving.chat_api import Limits


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mmjax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, step=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8,
                        help="requests decoded at once (continuous batching); 0: one request "
                        "at a time through the fixed-batch engine (the benchmark's baseline)")
    parser.add_argument("--steps-per-call", type=int, default=4,
                        help="decode steps per host round trip: more cuts the host's cost per "
                        "token, fewer the wait of a request that arrives mid-call")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="the most tokens a reply may have (max_tokens up to this)")
    parser.add_argument("--max-prompt", type=int, default=None,
                        help="the longest prompt in tokens, images included (default: the "
                        "LLM's context less --max-new-tokens)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot; beyond it: 429 with Retry-After")
    parser.add_argument("--max-images", type=int, default=4, help="images per conversation")
    parser.add_argument("--api-key", default=os.environ.get("MMJAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MMJAX_API_KEY)")
    parser.add_argument("--allow-local-images", metavar="DIR", default=None,
                        help="let image_url name files under DIR (off by default)")
    cli.add_video_args(parser, paths="none")  # video_url parts (LLaVA-OneVision)
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send (default: the model's directory name)")
    return parser.parse_args(argv)


def warm_up(slots: SlotEngine, m) -> float:
    """Compiles the decode step and a prefill before the first client (seconds taken)."""
    t0 = time.time()
    v = m.cfg.vision
    images = m.model_images([m.pixels(np.zeros((v.image_size, v.image_size, 3), np.uint8))])
    ids = m.raw_prompt_ids("<image>\nhello", m.image_tokens(images))
    job = slots.submit(Request(ids, images), Sampling(max_new_tokens=2))
    job.wait()
    return time.time() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # the serve extra
        import uvicorn
    except ImportError:
        raise UsageError("python -m mmjax.serve needs the serve extra: "
                         "pip install 'mmjax[serve]'") from None
    if args.allow_local_images and not os.path.isdir(args.allow_local_images):
        raise UsageError(f"--allow-local-images {args.allow_local_images}: no such directory")
    m = cli.load_model(args)
    context = m.cfg.llm.max_position_embeddings
    max_prompt = args.max_prompt or max(1, context - args.max_new_tokens)
    engine = m.engine(cli.say_compiling)
    if args.slots:
        slots = SlotEngine(engine, slots=args.slots, max_prompt=max_prompt,
                           max_new_tokens=args.max_new_tokens, max_queue=args.max_queue,
                           steps_per_call=args.steps_per_call).start()
    else:
        slots = OneAtATime(engine, max_prompt=max_prompt, max_new_tokens=args.max_new_tokens,
                           max_queue=args.max_queue).start()
    print(f"warming up ({args.slots} slots) ...", file=sys.stderr, flush=True)
    print(f"ready in {warm_up(slots, m):.1f}s", file=sys.stderr, flush=True)
    model_id = args.model_name or m.model_id
    limits = Limits(max_images=args.max_images, max_new_tokens=args.max_new_tokens,
                    local_images=args.allow_local_images, video_frames=args.frames,
                    video_fps=args.video_fps)
    app = build_app(m, slots, model_id, limits, api_key=args.api_key)
    print(f"serving {model_id} on http://{args.host}:{args.port}/ (API: "
          f"http://{args.host}:{args.port}/v1)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))
    with _stop_on_signals(server):
        server.run()
    print("stopped: every live request finished", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_signals(server):
    """SIGTERM / SIGINT: stop taking requests, finish the live ones (the app's shutdown
    drains the slots), exit 0. (uvicorn's own handlers re-raise the signal once done, which
    would end the process by the signal.)"""
    def stop(sig, frame):
        server.force_exit = server.should_exit and sig == signal.SIGINT  # Ctrl-C twice
        server.should_exit = True

    server.capture_signals = contextlib.nullcontext  # ours instead
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    cli.run_main(main)
