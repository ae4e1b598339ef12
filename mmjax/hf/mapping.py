"""Where each mmjax parameter comes from in a Hugging Face checkpoint.

`plan(...)` walks the mmjax parameter tree and, for each leaf, names the HF tensor(s) and
how to turn them into the leaf: PyTorch `nn.Linear` weights are (out, in) and are transposed
then split into head axes; conv patch kernels go from (D, C, p, q) to (p, q, C, D); scanned
layers stack one tensor per layer. The plan is checked against the checkpoint before any
data is read, so a missing, unexpected or mis-shaped tensor is reported by name up front.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from mmjax.hf.weight_files import Checkpoint, CheckpointError

# Candidate HF key prefixes of each part, tried in order against the checkpoint's keys
# (anchor: a tensor every checkpoint of that part has). Covers the hub's LLaVA layout
# (`language_model.model.*`), the current one (`model.language_model.*`) and vision towers
# saved with or without the `vision_model.` level.
PARTS = {
    "vision": {"": ("vision", ["vision_model.", ""])},
    "llm": {"": ("llm", ["model."])},
    "llava": {
        "vision_tower": ("vision", ["model.vision_tower.vision_model.", "model.vision_tower.",
                                    "vision_tower.vision_model.", "vision_tower."]),
        "projector": ("projector", ["model.multi_modal_projector.", "multi_modal_projector."]),
        "language_model": ("llm", ["model.language_model.", "language_model.model."]),
    },
}
_ANCHORS = {"vision": "embeddings.patch_embedding.weight", "projector": "linear_1.weight",
            "llm": "embed_tokens.weight"}
_LM_HEAD = {"model.": "", "model.language_model.": "", "language_model.model.": "language_model."}

# HF tensors an import may leave unread on purpose (text towers of CLIP/SigLIP, pooling
# heads, rotary buffers, vision layers above the one LLaVA reads).
IGNORABLE = [
    r"(^|\.)text_model\.", r"^(visual|text)_projection\.", r"^logit_(scale|bias)$",
    r"(^|\.)head\.", r"rotary_emb\.inv_freq$", r"embeddings\.position_ids$",
]


@dataclasses.dataclass
class Source:
    """One mmjax leaf: its HF keys (one per layer when stacked) and a transform per key."""

    keys: list[str]
    hf_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray]
    stacked: bool


def _leaf_transform(kind: str, target: tuple[int, ...], n_in: int):
    """(expected HF shape, transform) for one (unstacked) leaf of shape `target`."""
    if kind == "patch":  # (D, C, p, q) -> (p, q, C, D)
        p, q, c, d = target
        return (d, c, p, q), lambda w: np.transpose(w, (2, 3, 1, 0))
    if kind == "linear":
        n_out = math.prod(target[n_in:])
        return (n_out, math.prod(target[:n_in])), lambda w: w.T.reshape(target)
    if kind == "vector":
        return (math.prod(target),), lambda w: w.reshape(target)
    return target, lambda w: w


def _vision_key(rel: str) -> tuple[str, str, int]:
    """mmjax vision path -> (HF relative key, kind, n_in)."""
    fixed = {"class_embedding": "embeddings.class_embedding",
             "position_embedding": "embeddings.position_embedding.weight",
             "patch_embedding/kernel": "embeddings.patch_embedding.weight",
             "patch_embedding/bias": "embeddings.patch_embedding.bias"}
    if rel in fixed:
        kind = "patch" if rel == "patch_embedding/kernel" else "copy"
        return fixed[rel], kind, 1
    rel = rel.replace("pre_layernorm/", "pre_layrnorm/")
    rel = re.sub(r"^layers/layers_(\d+)/", r"encoder.layers.\1.", rel)
    rel = re.sub(r"^layers/layer/", "encoder.layers.{i}.", rel)
    return _generic(rel)


def _llm_key(rel: str) -> tuple[str, str, int]:
    if rel == "embed_tokens":
        return "embed_tokens.weight", "copy", 1
    rel = re.sub(r"^layers/layers_(\d+)/", r"layers.\1.", rel)
    rel = re.sub(r"^layers/layer/", "layers.{i}.", rel)
    return _generic(rel)


def _generic(rel: str) -> tuple[str, str, int]:
    *mods, leaf = rel.split("/")
    module = ".".join(mods)
    if leaf == "kernel":
        n_in = 2 if mods[-1] in ("o_proj", "out_proj") else 1
        return f"{module}.weight", "linear", n_in
    if leaf == "scale":
        return f"{module}.weight", "vector", 1
    return f"{module}.{leaf}", "vector", 1


def resolve_parts(kind: str, ckpt: Checkpoint) -> dict[str, tuple[str, str, str]]:
    """{mmjax root: (part kind, HF prefix, lm_head prefix)} for this checkpoint's layout."""
    keys = set(ckpt.keys())
    out = {}
    for root, (part, candidates) in PARTS[kind].items():
        found = [c for c in candidates if c + _ANCHORS[part] in keys]
        if not found:
            raise CheckpointError(
                f"{ckpt.dir}: no {part} tensors found: expected "
                + " or ".join(repr(c + _ANCHORS[part]) for c in candidates))
        out[root] = (part, found[0], _LM_HEAD.get(found[0], ""))
    if kind == "llava":  # LLaVA-NeXT's newline vector, at the top of either layout
        for key in ("model.image_newline", "image_newline"):
            if key in keys:
                out["image_newline"] = ("newline", key, "")
                break
    return out


@dataclasses.dataclass
class Location:
    """Where one mmjax leaf lives in an HF checkpoint."""

    keys: list[str]  # one per layer when the leaf is a stack of layers
    hf_shape: tuple[int, ...]  # of each key
    kind: str  # patch | linear | vector | copy
    n_in: int  # leading input axes of a linear kernel
    target: tuple[int, ...]  # the leaf's shape (one layer's, when stacked)
    stacked: bool


def locate(path: str, shape: tuple[int, ...], parts: dict,
           num_layers: dict[str, int]) -> Location:
    """The HF key(s) and shape of the mmjax leaf `path` ('a/b/c') in the `parts` layout."""
    root = next((r for r in sorted(parts, key=len, reverse=True)
                 if r in ("", path) or path.startswith(r + "/")), None)
    if root is None:
        raise CheckpointError(f"the checkpoint has no tensor for {path!r}")
    kind, *prefixes = parts[root]
    rel = path[len(root) + 1:] if root else path
    if kind == "newline":
        key, leaf_kind, n_in = prefixes[0], "vector", 1
    elif kind == "vision":
        key, leaf_kind, n_in = _vision_key(rel)
        key = prefixes[0] + key
    elif kind == "projector":
        key, leaf_kind, n_in = _generic(rel)
        key = prefixes[0] + key
    elif rel == "lm_head/kernel":
        key, leaf_kind, n_in = prefixes[1] + "lm_head.weight", "linear", 1
    else:
        key, leaf_kind, n_in = _llm_key(rel)
        key = prefixes[0] + key
    stacked = "{i}" in key
    target = tuple(shape[1:]) if stacked else tuple(shape)
    hf_shape, _ = _leaf_transform(leaf_kind, target, n_in)
    keys = [key.format(i=i) for i in range(num_layers[root])] if stacked else [key]
    return Location(keys, hf_shape, leaf_kind, n_in, target, stacked)


def to_hf(loc: Location, leaf: np.ndarray) -> np.ndarray:
    """One (unstacked) leaf in the HF tensor layout: the inverse of the import transform."""
    if loc.kind == "patch":  # (p, q, C, D) -> (D, C, p, q)
        return np.ascontiguousarray(np.transpose(leaf, (3, 2, 0, 1)))
    if loc.kind == "linear":  # (in..., out...) -> (out, in)
        n_in = math.prod(loc.target[:loc.n_in])
        return np.ascontiguousarray(leaf.reshape(n_in, -1).T)
    return np.ascontiguousarray(leaf.reshape(loc.hf_shape))


def plan(param_shapes: dict[str, tuple[int, ...]], parts: dict, num_layers: dict[str, int],
         ckpt: Checkpoint) -> dict[str, Source]:
    """Sources for every leaf ('a/b/c' paths -> shapes); raises naming what does not fit."""
    sources: dict[str, Source] = {}
    missing, bad_shape = [], []
    for path, shape in param_shapes.items():
        loc = locate(path, shape, parts, num_layers)
        keys, hf_shape, stacked = loc.keys, loc.hf_shape, loc.stacked
        _, fn = _leaf_transform(loc.kind, loc.target, loc.n_in)
        for k in keys:
            if not ckpt.has(k):
                missing.append(f"{k} (for {path})")
            elif ckpt.shape(k) != hf_shape:
                bad_shape.append(f"{k}: checkpoint has {ckpt.shape(k)}, the config implies "
                                 f"{hf_shape} (for {path})")
        sources[path] = Source(keys, hf_shape, fn, stacked)
    if missing:
        raise CheckpointError(f"{ckpt.dir}: missing tensor(s) in the checkpoint: "
                              + "; ".join(missing[:10]) + _more(missing))
    if bad_shape:
        raise CheckpointError(f"{ckpt.dir}: shape mismatch: " + "; ".join(bad_shape[:10])
                              + _more(bad_shape))
    return sources


def unused_keys(sources: dict[str, Source], ckpt: Checkpoint,
                extra_ignorable: list[str] = ()) -> list[str]:
    """Checkpoint tensors no leaf reads; raises if any is not known to be ignorable."""
    used = {k for s in sources.values() for k in s.keys}
    unused = [k for k in ckpt.keys() if k not in used]
    patterns = IGNORABLE + list(extra_ignorable)
    unexpected = [k for k in unused if not any(re.search(p, k) for p in patterns)]
    if unexpected:
        raise CheckpointError(f"{ckpt.dir}: unexpected tensor(s) the model has no place for: "
                              + ", ".join(unexpected[:10]) + _more(unexpected))
    return unused


def _more(items: list) -> str:
    return f" (and {len(items) - 10} more)" if len(items) > 10 else ""
