"""Turning model replies into LLaVA conversations, and rejecting the ones an image-only model
should not learn from.

Rejection reasons: truncated (the reply hit the token limit), unparsable (no question /
answer structure), empty, answer_too_long, mentions_annotation (talks about "the caption",
"the bounding boxes", or quotes coordinates the model cannot see).
"""
from __future__ import annotations

import re

from data_pipelines.adapt import stable_choice, stable_seed

REJECT_REASONS = ("truncated", "unparsable", "empty", "answer_too_long", "mentions_annotation")

# LLaVA's instructions for detailed descriptions (one is picked per image, deterministically)
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)

_ANNOTATION = re.compile(
    r"\b(the |these |those |given |provided )?(captions?|bounding[- ]box(es)?|"
    r"coordinates?|annotations?)\b|\[\s*0?\.\d+\s*,\s*0?\.\d+|\bX:\s*\d+\s*,?\s*Y:\s*\d+|"
    r"\b(described|mentioned|stated|according to the) (in )?(the )?(description|caption)",
    re.I)

MAX_WORDS = {"conversation": 150, "detail": 350, "complex_reasoning": 300, "multitask": 29}


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """'Question: ... === Answer: ...' blocks (LLaVA's format) -> pairs."""
    blocks = [b.strip() for b in re.split(r"^\s*===+\s*$", text, flags=re.M) if b.strip()]
    pairs, question = [], None
    for block in blocks:
        m = re.match(r"(Question|Answer)\s*:\s*(.*)", block, flags=re.S | re.I)
        if not m:
            raise Rejected("unparsable", f"block without Question:/Answer: {block[:60]!r}")
        label, body = m.group(1).lower(), m.group(2).strip()
        if label == "question":
            if question is not None:
                raise Rejected("unparsable", "two questions in a row")
            question = body
        else:
            if question is None:
                raise Rejected("unparsable", "an answer without a question")
            pairs.append((question, body))
            question = None
    if not pairs:
        raise Rejected("unparsable", "no question/answer pair")
    return pairs


def instruction_pairs(text: str) -> list[tuple[str, str]]:
    """'Instruction: ...' / 'Answer: ...' items (the multitask form) -> pairs."""
    items = re.findall(r"Instruction\s*:\s*(.*?)\n\s*Answer\s*:\s*(.*?)(?=\n\s*\n|\n\s*Instruction"
                       r"\s*:|\Z)", text.strip(), flags=re.S | re.I)
    pairs = [(q.strip(), a.strip()) for q, a in items]
    if not pairs:
        raise Rejected("unparsable", "no Instruction:/Answer: items")
    return pairs


def parse(kind: str, content: str, finish_reason: str, key: str) -> list[dict]:
    """A reply -> LLaVA conversation turns; raises Rejected. The first human turn carries
    `<image>` before or after the question, chosen at random per job (seeded by `key`), as
    LLaVA-Instruct has both."""
    if finish_reason == "length":
        raise Rejected("truncated", "the reply hit max_tokens")
    content = (content or "").strip()
    if not content:
        raise Rejected("empty", "empty reply")
    if kind == "detail":
        pairs = [(stable_choice(DETAIL_INSTRUCTIONS, key), content)]
    elif kind == "multitask":
        pairs = instruction_pairs(content)
    else:
        pairs = qa_pairs(content)
        if kind == "complex_reasoning":
            pairs = pairs[:1]
    for q, a in pairs:
        if not q or not a:
            raise Rejected("empty", "an empty question or answer")
        words = len(a.split())
        if words > MAX_WORDS[kind]:
            raise Rejected("answer_too_long", f"{words} words > {MAX_WORDS[kind]}")
        for text in (q, a):
            m = _ANNOTATION.search(text)
            if m:
                raise Rejected("mentions_annotation", f"{m.group(0)!r} in {text[:60]!r}")
    turns = []
    image_first = stable_seed(key, "image") % 2 == 0
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            q = f"<image>\n{q}" if image_first else f"{q}\n<image>"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns
