"""What the generation commands share: model and sampling options, images, prompts, errors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mmjax.data.image import ImageError, decode_image, resize_uint8
from mmjax.data.templates import IMAGE, ConversationError
from mmjax.inference.engine import Engine, Request
from mmjax.inference.load import RAW, Loaded, load
from mmjax.inference.sampling import Sampling
from mmjax.models.config import ConfigError


class UsageError(ValueError):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


def add_model_args(parser: argparse.ArgumentParser, step: bool = True) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
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


def load_model(args) -> Loaded:
    return load(args.hf, args.checkpoint, dtype=args.dtype, template=args.template)


def engine(m: Loaded) -> Engine:
    return Engine(m.model, m.params, m.tokenizer, mesh=m.mesh, rules=m.rules,
                  stop_ids=m.stop_ids())


def read_image(m: Loaded, path: str | Path) -> np.ndarray:
    """An image file -> uint8 [S, S, 3] at the tower's size (the run's aspect handling)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image {path} does not exist")
    try:
        image = decode_image(path.read_bytes())
    except ImageError as e:
        raise UsageError(f"image {path}: {e}") from None
    v = m.cfg.vision
    return resize_uint8(image, v.image_size, v.image_mean, m.image_aspect)


def request(m: Loaded, pairs: list[tuple[str, str]], images: list[np.ndarray],
            system: str | None = None) -> Request:
    """The request for a conversation whose last question is to be answered.

    With a template, a conversation with images but no <image> in its text gets LLaVA's
    layout (the image first, then the question); `raw` takes the last question as the
    model's text."""
    if m.template == RAW:
        text = pairs[-1][0]
        if images and IMAGE not in text:
            raise UsageError(f"--template raw: put {IMAGE} in the prompt where each image goes")
        ids = m.raw_prompt_ids(text)
    else:
        placed = sum(q.count(IMAGE) for q, _ in pairs)
        if images and not placed:
            pairs = [(f"{IMAGE}\n" * len(images) + pairs[0][0], pairs[0][1]), *pairs[1:]]
        try:
            ids = m.encoder().prompt_ids(system, pairs)
        except ConversationError as e:
            raise UsageError(f"prompt: {e}") from None
    n = int(np.sum(ids == m.cfg.image_token_id)) // max(1, m.cfg.image_tokens)
    if n != len(images):
        raise UsageError(f"the prompt has {n} {IMAGE} for {len(images)} image(s)")
    return Request(ids, images)


def run_main(main) -> None:
    """Runs a command's main: user mistakes as one line on stderr (exit 2)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices
    try:
        main()
    except (UsageError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
