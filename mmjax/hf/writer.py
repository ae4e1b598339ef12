"""Writing Hugging Face checkpoint directories: safetensors files (streamed tensor by tensor,
sharded with transformers' index), the LLaVA config and the llava-hf processor.

A `Tensor` knows its name, shape and dtype up front and fetches its values when it is
written, so a whole model is never in host memory (`mmjax.export` feeds it a run's
checkpoint one module at a time).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import transformers as tf

from mmjax.errors import ConfigError
from mmjax.hf import mapping
from mmjax.hf.config import LLAVA_ARCHS, architecture, hf_config_object
from mmjax.hf.loader import layer_counts
from mmjax.hf.weight_files import Checkpoint
from mmjax.models.config import LlavaConfig

# the key layout transformers writes for LlavaForConditionalGeneration (and
# LlavaNextForConditionalGeneration, with its newline vector at the top, as the hub's
# llava-v1.6 checkpoints have it)
LLAVA_PARTS = {"vision_tower": ("vision", "vision_tower.", ""),
               "projector": ("projector", "multi_modal_projector.", ""),
               "language_model": ("llm", "language_model.model.", "language_model."),
               "image_newline": ("newline", "image_newline", "")}
LLM_PARTS = {"language_model": ("llm", "model.", "")}
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32",
             "int64": "I64", "uint8": "U8", "bool": "BOOL"}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass
class Tensor:
    """One output tensor: its name, shape and dtype up front, its values on demand."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def model_tensors(read_module: Callable[[tuple[str, ...]], dict], cfg: LlavaConfig,
                  abstract_flat: dict, dtype, parts: dict, roots: tuple[str, ...]
                  ) -> Iterator[Tensor]:
    """The HF tensors of a model's parameters under `roots`, in `parts`' key layout.
    `abstract_flat`: 'a/b/c' path -> shape and dtype of every leaf (LoRA adapters skipped);
    `read_module(path)`: the leaves of the module at `path` as numpy arrays (adapters
    already folded in), called when a tensor is written."""
    layers = layer_counts(cfg)
    for path, leaf in abstract_flat.items():
        names = path.split("/")
        if names[0] not in roots or names[-1] in ("lora_a", "lora_b"):
            continue
        loc = mapping.locate(path, leaf.shape, parts, layers)
        module_path, leaf_name = tuple(names[:-1]), names[-1]
        for i, key in enumerate(loc.keys):
            def fetch(module_path=module_path, leaf_name=leaf_name, loc=loc, i=i):
                value = read_module(module_path)[leaf_name]
                value = value[i] if loc.stacked else value
                out = mapping.to_hf(loc, value)
                return out.astype(dtype, copy=False) if np.issubdtype(
                    out.dtype, np.floating) else out

            out_dtype = np.dtype(dtype) if np.issubdtype(leaf.dtype, np.floating) else \
                np.dtype(leaf.dtype)
            yield Tensor(key, tuple(loc.hf_shape), out_dtype, fetch)


def tower_extras(source: str | None, cfg: LlavaConfig, exported: set[str],
                 dtype) -> list[Tensor] | None:
    """Vision tensors mmjax does not build (layers above the feature layer, post-LayerNorm,
    SigLIP's pooling head), copied from the HF tower the run started from; None when that
    directory is not there."""
    if not source or not Path(source).is_dir():
        return None
    ckpt = Checkpoint(source)
    kind = "llava" if architecture(ckpt.config()) in LLAVA_ARCHS else "vision"
    prefix = mapping.resolve_parts(kind, ckpt)["vision_tower" if kind == "llava" else ""][1]
    built = layer_counts(cfg)["vision_tower"]
    wanted = [f"encoder.layers.{i}." for i in range(built, cfg.vision.num_layers)]
    wanted += ["post_layernorm.", "head."]
    out = []
    for key in ckpt.keys():
        rel = key[len(prefix):]
        name = LLAVA_PARTS["vision_tower"][1] + rel
        if key.startswith(prefix) and any(rel.startswith(w) for w in wanted) \
                and name not in exported:
            out.append(Tensor(name, tuple(ckpt.shape(key)), np.dtype(dtype),
                              lambda key=key: ckpt.read(key).astype(dtype, copy=False)))
    return out


def write_safetensors(path: Path, tensors: list[Tensor]) -> None:
    """One safetensors file, written tensor by tensor (the header is known up front)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": _ST_DTYPE[t.dtype.name], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            value = np.ascontiguousarray(t.fetch())
            if value.shape != t.shape or value.dtype != t.dtype:
                raise AssertionError(f"{t.key}: {value.shape} {value.dtype}, expected "
                                     f"{t.shape} {t.dtype}")
            value.tofile(f)  # the array's own buffer, no bytes copy
            del value


def write_weights(out: Path, tensors: list[Tensor], shard_bytes: int) -> None:
    """`model.safetensors`, or shards of at most `shard_bytes` with the index transformers
    writes (`model.safetensors.index.json`: total_size and weight_map)."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard)
        weight_map.update({t.key: name for t in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
         "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ConfigError(f"--shard-size {text!r}: a size such as 5GB or 500MB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def llava_config(cfg: LlavaConfig, tokenizer, dtype: str):
    """transformers' LlavaConfig (LlavaNextConfig for any resolution) for the model, with
    the tokenizer's special ids."""
    conf = hf_config_object(cfg)
    conf.image_seq_length = cfg.view_tokens
    conf.image_token_index = cfg.image_token_id
    for c in (conf, conf.text_config):
        c.bos_token_id, c.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        c.pad_token_id = tokenizer.pad_token_id
    conf.architectures = [architecture_of(cfg)]
    conf.dtype = dtype
    return conf


def architecture_of(cfg: LlavaConfig) -> str:
    """The transformers class a LLaVA model exports to."""
    if cfg.anyres_max:
        return "LlavaOnevisionForConditionalGeneration"
    return "LlavaNextForConditionalGeneration" if cfg.anyres else \
        "LlavaForConditionalGeneration"


def image_processor(cfg: LlavaConfig, aspect: str):
    """The transformers image processor that gives the pixels the run trained on, for each
    way `mmjax.data.image` brings an image to the tower's square: `pad` (LLaVA-1.5's
    expand2square with the tower's mean colour) -> LlavaImageProcessor with do_pad; `crop`
    -> CLIP's shortest-edge resize and centre crop; `resize` -> a squash to the square
    (SigLIP's). Written under the class names transformers maps to its PIL backends here
    (bicubic resampling as PIL does it). `anyres` -> LLaVA-NeXT's, with the model's
    pinpoints."""
    v, s = cfg.vision, cfg.vision.image_size
    common = dict(image_mean=list(v.image_mean), image_std=list(v.image_std))
    square = {"height": s, "width": s}
    if aspect == "anyres" and cfg.anyres_max:
        return tf.LlavaOnevisionImageProcessorPil(
            size=square, image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            **common)
    if aspect == "anyres":
        return tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": s}, crop_size=square,
            image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints], **common)
    if aspect == "pad":
        return tf.LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": s},
                                         crop_size=square, **common)
    if aspect == "crop":
        return tf.CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size=square, **common)
    if aspect == "resize":
        return tf.SiglipImageProcessorPil(size=square, **common)
    raise ConfigError(f"image aspect {aspect!r}: pad, crop, resize or anyres")


def processor(cfg: LlavaConfig, tokenizer, chat_template: str | None, aspect: str = "pad"):
    """The llava-hf processor: the image processor of the run's aspect (size, mean, std),
    the tokenizer, the patch size and feature strategy that give the image token count, the
    chat template (Jinja; `mmjax.data.jinja`)."""
    v = cfg.vision
    images = image_processor(cfg, aspect)
    return (tf.LlavaNextProcessor if cfg.anyres else tf.LlavaProcessor)(
        image_processor=images, tokenizer=tokenizer, patch_size=v.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select,
        chat_template=chat_template, image_token="<image>",
        num_additional_image_tokens=1 if v.has_cls else 0)


