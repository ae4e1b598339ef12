"""Shows how a conversation is encoded for training: the rendered text, then every token with
its id, `*` on the learned ones and `<image x N>` for the image tokens.

    python -m mmjax.data.layout --tokenizer DIR --template vicuna_v1 \
        [--conversation '[{"from": "human", "value": "<image>\\nHi"}, {"from": "gpt", ...}]']
        [--image-tokens 576] [--prompt]

`--prompt` shows the ids generation starts from (the same tokens up to where the reply
begins). Use it to check a tokenizer and template before training on them.
"""
from __future__ import annotations

import argparse
import json

from mmjax.batch import IGNORE
from mmjax.data.templates import get_template, normalize_turns
from mmjax.data.tokenize import ConversationEncoder
from mmjax.hf import load_tokenizer

EXAMPLE = [{"from": "human", "value": "What is in the picture? <image>"},
           {"from": "gpt", "value": "2 cats."},
           {"from": "human", "value": "What colour are they?"},
           {"from": "gpt", "value": "Orange."}]
IMAGE_ID = -200  # stands for the model's image token in the printout (as in LLaVA)


def layout(tokenizer, template: str, conversation, image_tokens: int = 576,
           prompt: bool = False) -> str:
    """The text and the token-by-token layout of `conversation` (LLaVA's JSON turns)."""
    enc = ConversationEncoder(tokenizer, get_template(template, tokenizer), image_tokens,
                              IMAGE_ID, 1 << 30)
    system, pairs = normalize_turns(conversation)
    images = sum(t["value"].count("<image>") for t in conversation)
    if prompt:
        ids = enc.prompt_ids(system, pairs)
        labels = [IGNORE] * len(ids)
        text = "".join(s.text for s in
                       enc.render(system, [*pairs[:-1], (pairs[-1][0], "")]).prompt())
    else:
        e = enc.encode(system, pairs, images)
        ids, labels = e.input_ids, e.labels
        text = enc.render(system, pairs).text
    parts, i = [], 0
    while i < len(ids):
        if ids[i] == IMAGE_ID:
            n = 1
            while i + n < len(ids) and ids[i + n] == IMAGE_ID:
                n += 1
            parts.append(f"<image x {n}>")
            i += n
            continue
        token = tokenizer.convert_ids_to_tokens(int(ids[i]))
        parts.append(f"{token!r}:{int(ids[i])}{'*' if labels[i] != IGNORE else ''}")
        i += 1
    return f"text: {text!r}\ntokens ({len(ids)}; * = learned):\n" + " ".join(parts)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m mmjax.data.layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--conversation", help="LLaVA JSON turns (default: a two-turn example)")
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--prompt", action="store_true", help="the generation prompt instead")
    args = p.parse_args(argv)

    conversation = json.loads(args.conversation) if args.conversation else EXAMPLE
    out = layout(load_tokenizer(args.tokenizer), args.template, conversation,
                 args.image_tokens, args.prompt)
    print(out)
    return out


if __name__ == "__main__":
    main()
