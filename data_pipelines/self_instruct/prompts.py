"""Prompt files and the image context they are filled with.

A prompt file (`prompts/KIND.txt`, or any file passed with --prompt-dir) has a `### system`
section and any number of `### example` sections, each with `## context` and `## response`:
the examples become few-shot user/assistant turns before the real context.

The context of an image is its captions, one per line, then its objects as
`name: [x1, y1, x2, y2]` with coordinates normalised to [0, 1] and two decimals (LLaVA's form),
from COCO instance boxes (`[x, y, width, height]` in pixels) or from "X Y Width Height".
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

PROMPT_DIR = Path(__file__).parent / "prompts"
KINDS = ("conversation", "detail", "complex_reasoning", "multitask")


@dataclasses.dataclass(frozen=True)
class Prompt:
    kind: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, response)

    def messages(self, context: str, **fields) -> list[dict]:
        system = self.system.format(**fields) if fields else self.system
        msgs = [{"role": "system", "content": system}]
        for ctx, resp in self.examples:
            msgs += [{"role": "user", "content": ctx}, {"role": "assistant", "content": resp}]
        msgs.append({"role": "user", "content": context})
        return msgs


def load_prompt(kind: str, prompt_dir: str | Path | None = None) -> Prompt:
    path = Path(prompt_dir or PROMPT_DIR) / f"{kind}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file {path} (kinds: {', '.join(KINDS)})")
    text = path.read_text(encoding="utf-8")
    sections = re.split(r"^### (system|example)\s*$", text, flags=re.M)
    system, examples = "", []
    for head, body in zip(sections[1::2], sections[2::2]):
        if head == "system":
            system = body.strip()
        else:
            m = re.match(r"\s*## context\s*\n(.*?)\n## response\s*\n(.*)", body, flags=re.S)
            if not m:
                raise ValueError(f"{path}: an example needs '## context' and '## response'")
            examples.append((m.group(1).strip(), m.group(2).strip()))
    if not system:
        raise ValueError(f"{path}: no '### system' section")
    return Prompt(kind, system, tuple(examples))


def normalize_box(box, width: int, height: int, form: str = "xywh") -> list[float]:
    """A pixel box -> [x1, y1, x2, y2] in [0, 1], two decimals. `form`: 'xywh' (COCO) or
    'xyxy'."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}")
    x, y, a, b = (float(v) for v in box)
    x2, y2 = (x + a, y + b) if form == "xywh" else (a, b)
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return [round(clip(x / width), 2), round(clip(y / height), 2), round(clip(x2 / width), 2),
            round(clip(y2 / height), 2)]


def parse_xywh_text(text: str) -> list[float]:
    """'X Y Width Height' (spaces or commas) -> four floats."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if len(parts) != 4:
        raise ValueError(f"expected 'X Y Width Height', got {text!r}")
    return [float(p) for p in parts]


def context(captions: list[str], objects: list[tuple[str, list[float]]]) -> str:
    lines = [c.strip() for c in captions if c and c.strip()]
    lines += [f"{name}: [{', '.join(f'{v:.2f}' for v in box)}]" for name, box in objects]
    return "\n".join(lines)


def coco_contexts(captions_json: dict, instances_json: dict | None = None) -> list[dict]:
    """[{image_id, file_name, context}] from COCO captions (+ instances) dicts, by image id."""
    images = {img["id"]: img for img in captions_json.get("images", [])}
    if instances_json:
        for img in instances_json.get("images", []):
            images.setdefault(img["id"], img)
    caps: dict = {}
    for ann in captions_json.get("annotations", []):
        caps.setdefault(ann.get("image_id"), []).append(ann.get("caption", ""))
    objs: dict = {}
    if instances_json:
        names = {c["id"]: c["name"] for c in instances_json.get("categories", [])}
        for ann in instances_json.get("annotations", []):
            img = images.get(ann.get("image_id"))
            if img is None or ann.get("category_id") not in names or "bbox" not in ann:
                continue
            box = normalize_box(ann["bbox"], img["width"], img["height"], "xywh")
            objs.setdefault(img["id"], []).append((names[ann["category_id"]], box))
    out = []
    for image_id in sorted(images):
        if not caps.get(image_id):
            continue
        out.append({"image_id": image_id, "file_name": images[image_id]["file_name"],
                    "context": context(caps[image_id], objs.get(image_id, []))})
    return out
