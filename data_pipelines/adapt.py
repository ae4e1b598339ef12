"""Adapting short-answer and multiple-choice data to instruction form, as LLaVA-1.5 does.

- Short answers get the format prompt "Answer the question using a single word or phrase."
  so the model keeps answering at length elsewhere and briefly here.
- Multiple choice lays out the options as `A. ...` lines and asks for the letter.
- Several questions about one image become one multi-turn conversation (capped in turns and
  in approximate tokens); only the first human turn carries `<image>`.
- Answers are normalised the way the VQA evaluation normalises them where a source needs it.
"""
from __future__ import annotations

import collections
import random
import re
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


# --------------------------------------------------------------------- VQA normalisation
# After the official VQA evaluation script (vqaEval.py): punctuation, digits, articles and
# contractions handled the same way so that "Two." and "2" and "two" compare equal.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def most_common_answer(answers: list[str]) -> str | None:
    """The most frequent normalised answer (ties: the first seen), or None if none."""
    normalised = [normalize_answer(a) for a in answers if a and a.strip()]
    normalised = [a for a in normalised if a]
    if not normalised:
        return None
    counts = collections.Counter(normalised)
    best = max(counts.values())
    return next(a for a in normalised if counts[a] == best)


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
