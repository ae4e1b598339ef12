"""Short-answer evaluation during and after training: greedy replies, exact match.

Prompts are the template's own layout up to the reply (`ConversationEncoder.prompt_ids`),
replies come from the KV-cache engine (mmjax.inference) and stop at the end of turn.
"""
from __future__ import annotations

import numpy as np

from mmjax.data.image import decode_image, resize_uint8
from mmjax.data.templates import IMAGE, get_template
from mmjax.data.tokenize import ConversationEncoder
from mmjax.inference import Engine, Request, Sampling
from mmjax.inference.load import stop_ids


def normalize_answer(text: str) -> str:
    return text.strip().strip(".").lower()


def greedy_answers(model, params, tokenizer, template: str, items, image_root,
                   blank_images: bool = False, max_new: int = 8, mesh=None,
                   rules=None) -> list[str]:
    """Replies for items [{question, image}] (image paths under image_root)."""
    cfg = model.cfg
    v = cfg.vision
    tmpl = get_template(template, tokenizer)
    encoder = ConversationEncoder(tokenizer, tmpl, cfg.image_tokens, cfg.image_token_id, 1 << 30)
    engine = Engine(model, params, tokenizer, mesh=mesh, rules=rules,
                    stop_ids=stop_ids(tokenizer, template))
    requests = []
    for item in items:
        question = item["question"]
        if IMAGE not in question:
            question = f"{IMAGE}\n{question}"
        if blank_images:
            px = np.full((v.image_size, v.image_size, 3), [int(255 * m) for m in v.image_mean],
                         np.uint8)
        else:
            image = decode_image((image_root / item["image"]).read_bytes())
            px = resize_uint8(image, v.image_size, v.image_mean, "pad")
        requests.append(Request(encoder.prompt_ids(None, [(question, "")]), [px]))
    results = engine.generate(requests, Sampling(max_new_tokens=max_new))
    return [r.text.strip() for r in results]


def short_answer_accuracy(model, params, tokenizer, template: str, items, image_root,
                          blank_images: bool = False, mesh=None, rules=None) -> dict:
    answers = greedy_answers(model, params, tokenizer, template, items, image_root,
                             blank_images, mesh=mesh, rules=rules)
    correct = [normalize_answer(a) == normalize_answer(it["answer"])
               for a, it in zip(answers, items)]
    by_kind: dict[str, list[bool]] = {}
    for ok, it in zip(correct, items):
        by_kind.setdefault(it.get("kind", "all"), []).append(ok)
    return {"accuracy": float(np.mean(correct)),
            **{f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(by_kind.items())},
            "examples": list(zip([it["question"] for it in items[:3]], answers[:3]))}
