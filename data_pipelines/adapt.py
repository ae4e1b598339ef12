"""Adapting short-answer and multiple-choice data to instruction form, as LLaVA-1.5 does.

- Short answers get the format prompt "Answer the question using a single word or phrase."
  so the model keeps answering at length elsewhere and briefly here.
- Multiple choice lays out the options as `A. ...` lines and asks for the letter.
- Several questions about one image become one multi-turn conversation (capped in turns and
  in approximate tokens); only the first human turn carries `<image>`.
- Answers stay as released: the VQA evaluation's normalisation (`mmjax.evaluation.vqa`)
  is for scoring predictions, not for training targets.
"""
from __future__ import annotations

import random
import string
import zlib

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


def short_answer(question: str, prompt: str = SHORT_ANSWER_PROMPT) -> str:
    question = question.strip()
    return f"{question}\n{prompt}" if prompt else question


def multiple_choice(question: str, choices: list[str],
                    prompt: str = MULTIPLE_CHOICE_PROMPT) -> str:
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{len(choices)} choices (need 2..26)")
    lines = [question.strip()] + [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    if prompt:
        lines.append(prompt)
    return "\n".join(lines)


def choice_letter(index: int, n_choices: int) -> str:
    if not 0 <= index < n_choices:
        raise ValueError(f"answer index {index} is outside the {n_choices} choices")
    return LETTERS[index]


# ------------------------------------------------------------------- multi-turn merging
def approx_tokens(text: str) -> int:
    """A tokenizer-free length estimate (about 1.3 tokens per word for Llama vocabularies)."""
    return int(len(text.split()) * 1.3) + 1


def merge_turns(qa_pairs: list[tuple[str, str]], max_turns: int = 0, max_tokens: int = 0,
                seed: int | None = None, image: bool = True) -> list[list[dict]]:
    """Splits one image's (question, answer) pairs into conversations of at most
    `max_turns` pairs and `max_tokens` (approximate) tokens each; 0 = no cap. Pairs are
    shuffled first when `seed` is given (LLaVA-1.5 shuffles the questions of an image)."""
    pairs = list(qa_pairs)
    if seed is not None:
        random.Random(seed).shuffle(pairs)
    conversations, current, tokens = [], [], 0
    for q, a in pairs:
        cost = approx_tokens(q) + approx_tokens(a)
        full = (max_turns and len(current) >= max_turns) or \
               (max_tokens and current and tokens + cost > max_tokens)
        if full:
            conversations.append(current)
            current, tokens = [], 0
        current.append((q, a))
        tokens += cost
    if current:
        conversations.append(current)
    return [_turns(c, image) for c in conversations]


def _turns(pairs, image: bool) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(pairs):
        value = f"<image>\n{q}" if image and i == 0 else q
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": a}]
    return turns


def stable_seed(*parts) -> int:
    """A seed from values, the same in every run and process (unlike hash())."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def stable_choice(options, key) -> str:
    return options[stable_seed(key) % len(options)]
