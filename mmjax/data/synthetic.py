"""The embedded demo's data: coloured shapes on a plain background, with captions (stage 1)
and instructions (stage 2): short-answer questions with LLaVA's format prompt and one-word
answers, conversational questions of the same kinds answered in full sentences, and
descriptions; every kind phrased several ways, some phrasings held out of training.

Everything is generated here (PNG files + LLaVA JSON), deterministic for a seed, so the demo
needs no download. Held-out images come from a different seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
SHORT = "Answer the question using a single word or phrase."
# Each kind of request in several phrasings: its own natural question, and general frames
# filled with the kind's word. Two frames per kind are held out of training (a different
# pair for each kind, so every frame and every word is seen, but never that sentence): the
# zero-shot test asks for a known thing in a known way never seen together.
FRAMES = ("What is the {} of the shapes?", "Can you tell me the {}?", "Tell me the {}.",
          "Which {} do you see?", "Name the {} in the image.", "What {} is it?")
WORDS = {"colour": "colour", "shape": "shape", "count": "number", "side": "side"}
NATURAL = {"colour": ("What colour is the shape?", "What colour are the shapes?"),
           "shape": ("What shape is in the image?", "Which shape is shown?"),
           "count": ("How many shapes are there?", "How many shapes do you see?"),
           "side": ("Is the shape on the left or the right?", "Which side are the shapes on?")}
HELD_OUT_FRAMES = {"colour": (0, 1), "shape": (2, 3), "count": (4, 5), "side": (0, 3)}
SEEN = {k: NATURAL[k] + tuple(f.format(WORDS[k]) for i, f in enumerate(FRAMES)
                              if i not in HELD_OUT_FRAMES[k]) for k in WORDS}
HELD_OUT = {k: tuple(FRAMES[i].format(WORDS[k]) for i in HELD_OUT_FRAMES[k]) for k in WORDS}
SEEN["describe"] = ("Describe the image briefly.", "Can you describe the image?",
                    "Give a short description.")
HELD_OUT["describe"] = ("Describe what is in the image.",)
PHRASINGS = {k: SEEN[k] + HELD_OUT[k] for k in SEEN}
SHORT_KINDS = ("colour", "shape", "count", "side")
QUESTIONS = {k: PHRASINGS[k][0] for k in SHORT_KINDS}  # one phrasing per kind
NUMBERS = {1: "one", 2: "two", 3: "three"}


def draw(rng, size: int):
    """(image, facts) for one picture: 1-3 shapes of one colour and kind on one side."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    side = str(rng.choice(SIDES))
    count = int(rng.integers(1, 4))
    bg = tuple(int(x) for x in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), bg)
    pen = ImageDraw.Draw(image)
    half = size // 2
    x0 = 0 if side == "left" else half
    slots = rng.permutation(3)[:count]
    r = max(3, size // 7)
    for k in slots:
        cx = x0 + half // 2 + int(rng.integers(-2, 3))
        cy = int((k + 0.5) * size / 3) + int(rng.integers(-1, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image, {"colour": colour, "shape": shape, "side": side,
                   "count": NUMBERS[count]}


# Stage 1's captions, in several wordings with the facts in different orders, as real
# caption data is worded many ways. One fixed wording put the side word at one fixed
# distance from the image, so stage 1 could read side from the image tokens' positions in
# the sequence alone, which stage 2 (the image behind a system prompt, questions between
# it and the answer) does not keep.
CAPTIONS = ("{N} {colour} {noun} on the {side}.",
            "On the {side}, {n} {colour} {noun}.",
            "A plain background with {n} {colour} {noun} on the {side}.",
            "The {side} side shows {n} {colour} {noun}.",
            "{Colour} {noun} on the {side}: {n}.",
            "There {be} {n} {colour} {noun} on the {side} of the image.")


def caption(facts, wording: int = 0) -> str:
    """A caption of the picture in wording `wording` of CAPTIONS (0: the plain one)."""
    n, shape = facts["count"], facts["shape"]
    noun = shape if n == "one" else shape + "s"
    return CAPTIONS[wording].format(
        n=n, N=n.capitalize(), colour=facts["colour"], Colour=facts["colour"].capitalize(),
        noun=noun, side=facts["side"], be="is" if n == "one" else "are")


def sentence(kind: str, facts) -> str:
    """The conversational (full-sentence) answer to a request of `kind`."""
    one = facts["count"] == "one"
    noun, be = (facts["shape"], "is") if one else (facts["shape"] + "s", "are")
    return {
        "colour": f"The {noun} {be} {facts['colour']}.",
        "shape": f"The shape is a {noun}." if one else f"The shapes are {noun}.",
        "count": f"There {be} {facts['count']} {facts['colour']} {noun} in the image.",
        "side": f"The {noun} {be} on the {facts['side']}.",
        "describe": f"{caption(facts)} The background is plain.",
    }[kind]


def _turns(rng, facts, format_prompt: bool) -> list[dict]:
    """One image's conversation, at most three turns: one or two short-answer questions (one
    word; with LLaVA's format prompt unless `format_prompt` is False, the ablation), up to
    one conversational question of another kind (a full sentence, no prompt) and a
    description; every question in a seen phrasing, in random order."""
    kinds = [str(k) for k in rng.permutation(SHORT_KINDS)]
    n_short = int(rng.integers(1, 3))
    qa = []
    for kind in kinds[:n_short]:
        q = str(rng.choice(SEEN[kind]))
        qa.append((f"{q}\n{SHORT}" if format_prompt else q, facts[kind]))
    if rng.random() < 0.6:
        kind = kinds[n_short]
        qa.append((str(rng.choice(SEEN[kind])), sentence(kind, facts)))
    describe = rng.random() < 0.3
    if describe and len(qa) < 3:  # at most three turns: a sample fits 160 tokens
        qa.append((str(rng.choice(SEEN["describe"])), sentence("describe", facts)))
    order = rng.permutation(len(qa))
    turns = []
    for j, i in enumerate(order):
        q, a = qa[i]
        turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                  {"from": "gpt", "value": a}]
    return turns


def write_split(root: Path, name: str, n: int, size: int, seed: int) -> dict:
    """Images under root/name/ and, beside them, the LLaVA JSON files for both stages
    (NAME_captions, NAME_instruct, NAME_instruct_noprompt: the same conversations with the
    short-answer questions stripped of the format prompt) and question files to evaluate
    with (`short_answer` benchmark files): NAME_qa (short, seen phrasings), NAME_qa_heldout
    (short, held-out phrasings), NAME_conv (every kind without the format prompt, seen and
    held-out phrasings in turn, answered in sentences). Returns the paths by key."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    files: dict[str, list] = {k: [] for k in ("captions", "instruct", "instruct_noprompt", "qa",
                                              "qa_heldout", "conv")}
    for i in range(n):
        image, facts = draw(rng, size)
        rel = f"{name}/{i:05d}.png"
        image.save(root / rel)
        files["captions"].append({"id": f"{name}-cap-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\n"},
            {"from": "gpt", "value": caption(facts, int(rng.integers(len(CAPTIONS))))}]})
        state = rng.bit_generator.state
        files["instruct"].append({"id": f"{name}-qa-{i}", "image": rel,
                                  "conversations": _turns(rng, facts, True)})
        rng.bit_generator.state = state  # the same draws: the same questions, no prompt
        files["instruct_noprompt"].append({"id": f"{name}-qa-{i}", "image": rel,
                                           "conversations": _turns(rng, facts, False)})
        for kind in SHORT_KINDS:
            for key, pool in (("qa", SEEN), ("qa_heldout", HELD_OUT)):
                files[key].append({"id": f"{name}-{key}-{kind}-{i}", "image": rel,
                                   "kind": kind, "answer": facts[kind],
                                   "question": f"{rng.choice(pool[kind])}\n{SHORT}"})
        for kind in (*SHORT_KINDS, "describe"):
            seen = (i + len(kind)) % 2 == 0  # seen and held-out phrasings by turns
            for pool in (SEEN if seen else HELD_OUT,):
                facts_in = [facts[k] for k in SHORT_KINDS] if kind == "describe" else [
                    facts[kind]]
                files["conv"].append({
                    "id": f"{name}-conv-{kind}-{'seen' if seen else 'heldout'}-{i}",
                    "image": rel, "kind": f"{kind}/{'seen' if seen else 'heldout'}",
                    "question": str(rng.choice(pool[kind])), "answer": sentence(kind, facts),
                    "facts": facts_in})
    paths = {}
    for key, data in files.items():
        paths[key] = root / f"{name}_{key}.json"
        paths[key].write_text(json.dumps(data))
    return paths


def vocabulary_text() -> list[str]:
    """Text to train the demo tokenizer on (every word the data uses)."""
    words = [SHORT, *(q for qs in PHRASINGS.values() for q in qs), *COLOURS, *SHAPES,
             *SIDES, *NUMBERS.values()]
    rng = np.random.default_rng(0)
    out = list(words)
    for _ in range(200):
        _, facts = draw(rng, 16)
        out += [caption(facts, w) for w in range(len(CAPTIONS))]
        out += [sentence(kind, facts) for kind in PHRASINGS]
    return out
