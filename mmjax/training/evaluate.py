"""Short-answer evaluation: greedy decoding of a few tokens after a prompt, exact match.

No KV cache (the demo and tests use tiny models): each new token re-runs the forward over the
prompt so far, padded to a fixed length so one compiled function serves every step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.batch import device_pixels
from mmjax.data.image import decode_image, resize_uint8
from mmjax.data.templates import get_template
from mmjax.data.tokenize import ConversationEncoder


def normalize_answer(text: str) -> str:
    return text.strip().strip(".").lower()


def greedy_answers(model, params, tokenizer, encoder: ConversationEncoder, items, image_root,
                   blank_images: bool = False, max_new: int = 4, batch: int = 32):
    """Answers for items [{question, image}] (image paths under image_root)."""
    cfg = model.cfg
    v = cfg.vision
    prompts, pixels = [], []
    eos = encoder.tokenizer.convert_tokens_to_ids(encoder.template.end_of_turn
                                                  or encoder.tokenizer.eos_token)
    for item in items:
        question = item["question"]
        if "<image>" not in question:
            question = "<image>\n" + question
        prompts.append(encoder.prompt_ids(None, [(question, "")]))
        if blank_images:
            px = np.full((v.image_size, v.image_size, 3), [int(255 * m) for m in v.image_mean],
                         np.uint8)
        else:
            image = decode_image((image_root / item["image"]).read_bytes())
            px = resize_uint8(image, v.image_size, v.image_mean, "pad")
        pixels.append(px)
    length = max(len(p) for p in prompts) + max_new

    @jax.jit
    def next_token(params, ids, pixel_values, last):
        pv = device_pixels(pixel_values, v)
        logits = model.apply({"params": params}, ids, pv)
        return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], 1)[:, 0], -1)

    answers = []
    for start in range(0, len(items), batch):
        chunk = prompts[start:start + batch]
        n = len(chunk)
        ids = np.zeros((batch, length), np.int32)
        lens = np.ones(batch, np.int32)
        for i, p in enumerate(chunk):
            ids[i, :len(p)] = p
            lens[i] = len(p)
        px = np.zeros((batch, 1, v.image_size, v.image_size, 3), np.uint8)
        px[:n, 0] = pixels[start:start + n]
        out = [[] for _ in range(n)]
        done = np.zeros(batch, bool)
        for _ in range(max_new):
            tok = np.asarray(next_token(params, ids, px, lens - 1))
            for i in range(n):
                if not done[i]:
                    if tok[i] == eos:
                        done[i] = True
                    else:
                        out[i].append(int(tok[i]))
                        ids[i, lens[i]] = tok[i]
                        lens[i] += 1
        answers += [tokenizer.decode(o) for o in out]
    return answers


def short_answer_accuracy(model, params, tokenizer, template: str, items, image_root,
                          blank_images: bool = False) -> dict:
    cfg = model.cfg
    encoder = ConversationEncoder(tokenizer, get_template(template, tokenizer),
                                  cfg.image_tokens, cfg.image_token_id, 4096)
    answers = greedy_answers(model, params, tokenizer, encoder, items, image_root, blank_images)
    correct = [normalize_answer(a) == normalize_answer(it["answer"])
               for a, it in zip(answers, items)]
    by_kind: dict[str, list[bool]] = {}
    for ok, it in zip(correct, items):
        by_kind.setdefault(it.get("kind", "all"), []).append(ok)
    return {"accuracy": float(np.mean(correct)),
            **{f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(by_kind.items())},
            "examples": list(zip([it["question"] for it in items[:3]], answers[:3]))}
