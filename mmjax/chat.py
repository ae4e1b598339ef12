"""An interactive chat with a trained or imported LLaVA, in the terminal.

    python -m mmjax.chat (--hf DIR | --checkpoint WORKDIR) [--image PATH | --video PATH]

Type a message and the reply streams as it is generated. Commands:
    /image PATH   chat about another image (starts a new conversation)
    /video PATH   chat about a video (LLaVA-OneVision; starts a new conversation)
    /reset        start a new conversation with the same image
    /exit         quit (also Ctrl-D)
Works with piped input too: one message or command per line.
"""
from __future__ import annotations

import argparse
import sys

import jax

from mmjax.errors import UsageError
from mmjax.inference import cli
from mmjax.inference.prompt import request


class Chat:
    """The conversation so far and its image; `say` streams the reply to `out`."""

    def __init__(self, m, engine, sampling, out=sys.stdout, seed: int = 0):
        self.m, self.engine, self.sampling, self.out = m, engine, sampling, out
        self.seed = seed
        self.images: list = []
        self.videos: list = []
        self.pairs: list[tuple[str, str]] = []
        self.turn = 0

    def set_image(self, path: str) -> None:
        self.images, self.videos = [self.m.read_image(path)], []
        self.pairs = []

    def set_video(self, path: str, frames: int, fps: float) -> None:
        self.images, self.videos = [], [self.m.read_video(path, frames, fps)]
        self.pairs = []

    def reset(self) -> None:
        self.pairs = []

    def say(self, message: str) -> str:
        req = request(self.m, self.pairs + [(message, "")], self.images, videos=self.videos)
        ids: list[int] = []
        shown = [""]

        def stream(_row: int, token: int) -> None:
            ids.append(token)
            text = self.m.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            # print what is new; text ending in a partial character waits for the rest
            if text.startswith(shown[0]) and not text.endswith("\ufffd"):
                self.out.write(text[len(shown[0]):])
                self.out.flush()
                shown[0] = text

        key = jax.random.fold_in(jax.random.key(self.seed), self.turn)
        result = self.engine.generate([req], self.sampling, seed=key, on_token=stream)[0]
        reply, full = result.text.strip(), result.text.lstrip()
        if full.startswith(shown[0]):
            self.out.write(full[len(shown[0]):].rstrip() + "\n")
        else:  # a stop string was cut after it was shown: the reply again, on its own line
            self.out.write(f"\n[reply] {reply}\n")
        self.out.flush()
        self.pairs.append((message, reply))
        self.turn += 1
        return reply


def main(argv=None, stdin=None, out=None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m mmjax.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser, step=True)
    parser.add_argument("--image", default=None, metavar="PATH")
    cli.add_video_args(parser, paths="one")
    cli.add_sampling_args(parser)
    args = parser.parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    m = cli.load_model(args)
    chat = Chat(m, m.engine(cli.say_compiling), cli.sampling(args), out, seed=args.seed)
    if args.image:
        chat.set_image(args.image)
    if args.video:
        chat.set_video(args.video, args.frames, args.video_fps)
    interactive = stdin.isatty()
    replies = []
    while True:
        if interactive:
            out.write("USER: ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            out.write("(new conversation)\n")
            continue
        if line.startswith(("/image", "/video")):
            kind, path = line[1:6], line[6:].strip()
            try:
                if kind == "image":
                    chat.set_image(path)
                else:
                    chat.set_video(path, args.frames, args.video_fps)
            except UsageError as e:
                out.write(f"error: {e}\n")
                continue
            out.write(f"({kind} {path}; new conversation)\n")
            continue
        if line.startswith("/"):
            out.write("commands: /image PATH, /video PATH, /reset, /exit\n")
            continue
        out.write("ASSISTANT: ")
        out.flush()
        try:
            replies.append(chat.say(line))
        except UsageError as e:
            out.write(f"\nerror: {e}\n")
    out.flush()
    return replies


if __name__ == "__main__":
    cli.run_main(main)
