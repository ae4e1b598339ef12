"""Prompt files and the image context they are filled with.

A prompt file (`prompts/KIND.txt`, or any file passed with --prompt-dir) has a `### system`
section and any number of `### example` sections, each with `## context` and `## response`:
the examples become few-shot user/assistant turns before the real context.

The context of an image depends on the kind, as the prompts that made LLaVA-Instruct and
the seed's multitask data present it:
- `conversation`: the captions only, one per line (its instructions speak of "the image",
  never of boxes);
- `detail`, `complex_reasoning`: the captions, then each object as `name: [x1, y1, x2, y2]`,
  normalised to [0, 1] with two decimals (LLaVA's form);
- `multitask`: the captions, then one line per region with its left-top corner and size in
  pixels: `elephant heard on rocks X: 73 Y: 80 Width: 418 Height: 418`.
Boxes come from COCO instances (`[x, y, width, height]` in pixels) or "X Y Width Height".
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
    """Captions, then `name: [x1, y1, x2, y2]` (normalised boxes)."""
    lines = [c.strip() for c in captions if c and c.strip()]
    lines += [f"{name}: [{', '.join(f'{v:.2f}' for v in box)}]" for name, box in objects]
    return "\n".join(lines)


def region_lines(objects: list[tuple[str, list[float]]]) -> list[str]:
    """`name X: 73 Y: 80 Width: 418 Height: 418` per pixel box [x, y, width, height]."""
    return [f"{name} X: {round(b[0])} Y: {round(b[1])} Width: {round(b[2])} "
            f"Height: {round(b[3])}" for name, b in objects]


def render_context(ctx: dict, kind: str) -> str:
    """The text a kind's prompt gets for one image (see the module docstring). A context
    given as text (`ctx["context"]`) is used as it is for every kind."""
    if "context" in ctx:
        return ctx["context"]
    captions = [c.strip() for c in ctx.get("captions", []) if c and c.strip()]
    objects = ctx.get("objects", [])
    if kind == "conversation":
        return "\n".join(captions)
    if kind == "multitask":
        return "\n".join(captions + region_lines(objects))
    w, h = ctx["width"], ctx["height"]
    return context(captions, [(n, normalize_box(b, w, h, "xywh")) for n, b in objects])


def coco_contexts(captions_json: dict, instances_json: dict | None = None) -> list[dict]:
    """[{image_id, file_name, width, height, captions, objects: [(name, [x, y, w, h])]}] from
    COCO captions (+ instances) dicts, by image id; images without captions are left out."""
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
            objs.setdefault(img["id"], []).append(
                (names[ann["category_id"]], [float(v) for v in ann["bbox"]]))
    out = []
    for image_id in sorted(images):
        if not caps.get(image_id):
            continue
        img = images[image_id]
        out.append({"image_id": image_id, "file_name": img["file_name"],
                    "width": img["width"], "height": img["height"],
                    "captions": caps[image_id], "objects": objs.get(image_id, [])})
    return out
