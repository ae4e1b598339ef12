"""The embedded demo's data: coloured shapes on a plain background, with captions (stage 1),
short-answer questions in LLaVA's format-prompt style, multi-turn and counting (stage 2).

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
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the image?",
    "side": "Is the shape on the left or the right?",
    "count": "How many shapes are there?",
}
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


def caption(facts) -> str:
    n, shape = facts["count"], facts["shape"]
    noun = shape if n == "one" else shape + "s"
    return f"{n.capitalize()} {facts['colour']} {noun} on the {facts['side']}."


def write_split(root: Path, name: str, n: int, size: int, seed: int) -> dict:
    """Images under root/name/ and the LLaVA JSON files for both stages; returns paths."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    captions, instruct, qa = [], [], []
    for i in range(n):
        image, facts = draw(rng, size)
        rel = f"{name}/{i:05d}.png"
        image.save(root / rel)
        captions.append({"id": f"{name}-cap-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": caption(facts)}]})
        kinds = list(rng.permutation(list(QUESTIONS)))
        turns = []
        for j, kind in enumerate(kinds[:int(rng.integers(1, 4))]):
            q = f"{QUESTIONS[kind]} {SHORT}"
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                      {"from": "gpt", "value": facts[kind]}]
        if rng.random() < 0.2:
            turns += [{"from": "human", "value": "Describe the image briefly."},
                      {"from": "gpt", "value": caption(facts)}]
        instruct.append({"id": f"{name}-qa-{i}", "image": rel, "conversations": turns})
        for kind in QUESTIONS:
            qa.append({"id": f"{name}-{kind}-{i}", "image": rel, "kind": kind,
                       "question": f"{QUESTIONS[kind]} {SHORT}", "answer": facts[kind]})
    paths = {}
    for key, data in (("captions", captions), ("instruct", instruct), ("qa", qa)):
        paths[key] = root / f"{name}_{key}.json"
        paths[key].write_text(json.dumps(data))
    return paths


def vocabulary_text() -> list[str]:
    """Text to train the demo tokenizer on (every word the data uses)."""
    words = [SHORT, "Describe the image briefly.", *QUESTIONS.values(), *COLOURS, *SHAPES,
             *SIDES, *NUMBERS.values()]
    rng = np.random.default_rng(0)
    out = list(words)
    for _ in range(200):
        _, facts = draw(rng, 16)
        out.append(caption(facts))
    return out
