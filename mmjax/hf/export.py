"""Hugging Face export: a training work dir becomes a directory that transformers (and what
reads its layout: vLLM, the llava-hf processor) loads as it is.

    python -m mmjax.hf export --checkpoint WORKDIR[:STEP] --out DIR [--dtype bfloat16]
        [--shard-size 5GB] [--merge-lora] [--overwrite] [--llm-only | --projector-only]

Writes `config.json` (LlavaForConditionalGeneration), `model.safetensors` (or shards
`model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`) in the key layout
transformers itself saves (`vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`), `generation_config.json`, the
run's tokenizer (with `<image>` and pad), and the processor files (`preprocessor_config.json`,
`processor_config.json`, `chat_template.jinja` rendering the run's template).

The parameters are read from the checkpoint one module at a time (no optimizer state, no
whole-model copy): host memory holds about one tensor. The vision layers above the feature
layer and the tower's post-LayerNorm / head, which mmjax does not build, are copied from the
HF tower the run started from when it is still there; otherwise transformers initialises
them (they do not change LLaVA's outputs, which read the feature layer).
The output is written under a temporary name and renamed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mmjax.hf import mapping
from mmjax.hf.weight_files import Checkpoint
from mmjax.models.config import ConfigError, LlavaConfig

log = logging.getLogger("mmjax.hf.export")

# the key layout transformers writes for LlavaForConditionalGeneration
LLAVA_PARTS = {"vision_tower": ("vision", "vision_tower.", ""),
               "projector": ("projector", "multi_modal_projector.", ""),
               "language_model": ("llm", "language_model.model.", "language_model.")}
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


# --------------------------------------------------------------------------- reading


class ModuleReader:
    """A run's parameters, one module (a dict of leaves) at a time, from its checkpoint."""

    def __init__(self, workdir: Path, step: int | None, abstract: dict, device):
        from mmjax.training.checkpoint import SubtreeReader

        try:
            self._reader = SubtreeReader(Path(workdir) / "checkpoints", step)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        self.step = self._reader.step
        self._abstract, self._device = abstract, device
        self._cache: tuple | None = None

    def module(self, path: tuple[str, ...]) -> dict:
        """{leaf name: np.ndarray} of the module at `path` (cached: the last one read)."""
        if self._cache and self._cache[0] == path:
            return self._cache[1]
        import jax

        node = self._abstract
        for k in path:
            node = node[k]
        sharding = jax.sharding.SingleDeviceSharding(self._device)
        leaves = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                  for k, v in node.items() if not isinstance(v, dict)}
        out = self._reader.read(("params", *path), leaves)
        values = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
        self._cache = (path, values)
        return values

    def close(self) -> None:
        self._reader.close()


def _merged(module: dict, rt) -> dict:
    """A module's leaves with its LoRA adapters folded into the kernel (W + alpha/r A B)."""
    if "lora_a" not in module:
        return module
    from mmjax.training import lora

    return {k: np.asarray(v) for k, v in lora.merge(module, rt).items()}


def model_tensors(reader: ModuleReader, cfg: LlavaConfig, abstract_flat: dict, rt, dtype,
                  parts: dict, roots: tuple[str, ...]) -> Iterator[Tensor]:
    """The HF tensors of the run's parameters under `roots`, in `parts`' key layout."""
    from mmjax.hf.loader import _layer_counts

    layers = _layer_counts(cfg)
    for path, leaf in abstract_flat.items():
        names = path.split("/")
        if names[0] not in roots or names[-1] in ("lora_a", "lora_b"):
            continue
        loc = mapping.locate(path, leaf.shape, parts, layers)
        module_path, leaf_name = tuple(names[:-1]), names[-1]
        for i, key in enumerate(loc.keys):
            def fetch(module_path=module_path, leaf_name=leaf_name, loc=loc, i=i):
                value = _merged(reader.module(module_path), rt)[leaf_name]
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
    from mmjax.hf.config import LLAVA_ARCHS, architecture

    if not source or not Path(source).is_dir():
        return None
    ckpt = Checkpoint(source)
    kind = "llava" if architecture(ckpt.config()) in LLAVA_ARCHS else "vision"
    prefix = mapping.resolve_parts(kind, ckpt)["vision_tower" if kind == "llava" else ""][1]
    wanted = [f"encoder.layers.{i}." for i in range(_built_layers(cfg), cfg.vision.num_layers)]
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


# --------------------------------------------------------------------------- writing


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


# --------------------------------------------------------------------------- configs


CHAT_TEMPLATES = {
    # each renders exactly what mmjax.data.templates renders (tested against it): a user
    # message's images first, as "<image>\n", then its text
    "vicuna_v1": (
        "{%- set ns = namespace(system=SYSTEM) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}{{- ns.system + ' ' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{- 'USER: ' + TEXT + ' ' -}}"
        "{%- else -%}{{- 'ASSISTANT: ' + TEXT + '</s>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"),
    "mistral_instruct": (
        "{%- set ns = namespace(system='', first=true) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{- '[INST] ' -}}"
        "{%- if ns.first and ns.system -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}"
        "{%- endif -%}{%- set ns.first = false -%}{{- TEXT + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + TEXT + ' </s>' -}}{%- endif -%}{%- endfor -%}"),
    "chatml": (
        "{%- set ns = namespace(system=SYSTEM) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + TEXT + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama_3": (
        "{%- set ns = namespace(system=SYSTEM) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' + "
        "ns.system | trim + '<|eot_id|>' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + TEXT | trim + "
        "'<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
}
# a message's text: a string as it is, or its image parts as "<image>\n" then its text parts
_TEXT = ("((m['content'] if m['content'] is string else "
         "(m['content'] | selectattr('type', 'equalto', 'image') | map(attribute='type') "
         "| map('replace', 'image', '<image>\\n') | join('')) + "
         "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
         "| join(' '))))")


def chat_template(name: str) -> str | None:
    """A Jinja chat template that renders the run's conversation template (None for
    `plain`, which is not a chat format, and for the tokenizer's own)."""
    from mmjax.data import templates

    if name not in CHAT_TEMPLATES:
        return None
    system = {"vicuna_v1": templates.VICUNA_SYSTEM, "chatml": templates.CHATML_SYSTEM,
              "llama_3": templates.LLAMA3_SYSTEM}.get(name, "")
    return CHAT_TEMPLATES[name].replace("SYSTEM", json.dumps(system)).replace("TEXT", _TEXT)


def llava_config(cfg: LlavaConfig, tokenizer, dtype: str):
    """transformers' LlavaConfig for the model, with the tokenizer's special ids."""
    from mmjax.hf.config import hf_config_object

    conf = hf_config_object(cfg)
    conf.image_seq_length = cfg.image_tokens
    conf.image_token_index = cfg.image_token_id
    for c in (conf, conf.text_config):
        c.bos_token_id, c.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        c.pad_token_id = tokenizer.pad_token_id
    conf.architectures = ["LlavaForConditionalGeneration"]
    conf.dtype = dtype
    return conf


def processor(cfg: LlavaConfig, tokenizer, template: str):
    """The llava-hf processor: the tower's image processor (size, mean, std), the tokenizer,
    the patch size and feature strategy that give the image token count, the chat
    template."""
    import transformers as tf

    v, s = cfg.vision, cfg.vision.image_size
    if v.family == "clip":
        images = tf.CLIPImageProcessor(size={"shortest_edge": s},
                                       crop_size={"height": s, "width": s},
                                       image_mean=list(v.image_mean), image_std=list(v.image_std))
    else:
        images = tf.SiglipImageProcessor(size={"height": s, "width": s},
                                         image_mean=list(v.image_mean),
                                         image_std=list(v.image_std))
    return tf.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=v.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select,
        chat_template=chat_template(template), image_token="<image>",
        num_additional_image_tokens=1 if v.has_cls else 0)


# --------------------------------------------------------------------------- export


def export(spec: str, out: str | Path, dtype: str = "bfloat16", shard_size: str = "5GB",
           merge_lora: bool = False, overwrite: bool = False, what: str = "llava",
           say=print) -> Path:
    """Writes the run `spec` (WORKDIR[:STEP]) to `out` as an HF directory (`what`: llava,
    llm or projector). Returns the directory."""
    import jax
    import transformers as tf

    from mmjax import configlib
    from mmjax.inference.load import parse_checkpoint
    from mmjax.models.factory import abstract_variables
    from mmjax.sharding import plain
    from mmjax.training import recipe as recipe_lib
    from mmjax.training.config import TrainConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace it")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: bfloat16, float16 or float32")
    workdir, step = parse_checkpoint(spec)
    if not (workdir / recipe_lib.MODEL_FILE).is_file():
        raise ConfigError(f"{workdir} has no {recipe_lib.MODEL_FILE} (not a training work dir, "
                          "or one from before runs saved their model)")
    tc = configlib.from_saved(TrainConfig, json.loads((workdir / "config.json").read_text()))
    recipe = recipe_lib.read(workdir)
    cfg, rt = recipe.cfg, tc.model_runtime
    if rt.lora_rank and not merge_lora:
        raise ConfigError("this run trained LoRA adapters: pass --merge-lora to fold them "
                          "into the weights (a transformers LLaVA has no adapters)")
    abstract = plain(abstract_variables(cfg, rt)["params"])
    flat = {"/".join(k.key for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    reader = ModuleReader(workdir, step, abstract, jax.devices("cpu")[0])
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = recipe.tokenizer
    try:
        if what == "projector":
            _write_projector(tmp, reader, cfg, flat, rt)
        else:
            parts, roots = ((LLM_PARTS, ("language_model",)) if what == "llm" else
                            (LLAVA_PARTS, ("vision_tower", "projector", "language_model")))
            tensors = list(model_tensors(reader, cfg, flat, rt, np_dtype, parts, roots))
            if what == "llava":
                source = recipe.sources.get("hf_vision") or recipe.sources.get("hf_llava")
                extras = tower_extras(source, cfg, {t.key for t in tensors}, np_dtype)
                tensors += extras or []
                if extras is None:
                    say(f"note: the HF tower the run started from ({source or 'unknown'}) is "
                        "not there: transformers will initialise the vision layers above the "
                        "feature layer and the post-LayerNorm (LLaVA's outputs do not read "
                        "them)")
            write_weights(tmp, tensors, parse_size(shard_size))
            if what == "llm":
                from mmjax.hf.config import hf_config_object

                conf = hf_config_object(cfg.llm)
                conf.architectures = [CAUSAL_LM[cfg.llm.family]]
                conf.bos_token_id, conf.eos_token_id = tokenizer.bos_token_id, \
                    tokenizer.eos_token_id
                conf.pad_token_id, conf.dtype = tokenizer.pad_token_id, dtype
                conf.save_pretrained(tmp)
                tokenizer.save_pretrained(str(tmp))
            else:
                llava_config(cfg, tokenizer, dtype).save_pretrained(tmp)
                proc = processor(cfg, tokenizer, recipe.template)
                proc.save_pretrained(str(tmp))
                # also the per-component file older transformers and vLLM read
                proc.image_processor.save_pretrained(str(tmp))
            tf.GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        (tmp / "mmjax_export.json").write_text(json.dumps(
            {"workdir": str(workdir.absolute()), "step": reader.step, "dtype": dtype,
             "what": what, "template": recipe.template, "merged_lora": bool(rt.lora_rank)},
            indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    say(f"exported {workdir} step {reader.step} ({what}, {dtype}) to {out}")
    return out


def _built_layers(cfg: LlavaConfig) -> int:
    from mmjax.hf.loader import _layer_counts

    return _layer_counts(cfg)["vision_tower"]


def _write_projector(out: Path, reader: ModuleReader, cfg, flat: dict, rt) -> None:
    """Stage 1's projector under LLaVA's names (`model.mm_projector.{0,2,..}.weight`, as
    its `--pretrain_mm_mlp_adapter` reads): `mm_projector.bin` (with torch) and
    `mm_projector.safetensors`."""
    tensors = {}
    for path in flat:
        names = path.split("/")
        if names[0] != "projector":
            continue
        module = names[1]  # linear_K (mlp) or linear
        k = int(module.rsplit("_", 1)[1]) if "_" in module else 1
        index = "" if cfg.projector.kind == "linear" else f"{2 * (k - 1)}."
        value = reader.module(tuple(names[:-1]))[names[-1]]
        name = "weight" if names[-1] == "kernel" else names[-1]
        tensors[f"model.mm_projector.{index}{name}"] = np.ascontiguousarray(
            value.T if names[-1] == "kernel" else value).astype(np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, str(out / "mm_projector.safetensors"), metadata={"format": "pt"})
    try:
        import torch
    except ImportError:
        return
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, out / "mm_projector.bin")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.hf export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="WORKDIR[:STEP]")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--merge-lora", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--llm-only", action="store_true",
                      help="the language model alone, as its own *ForCausalLM")
    what.add_argument("--projector-only", action="store_true",
                      help="stage 1's projector under LLaVA's mm_projector names")
    args = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        export(args.checkpoint, args.out, args.dtype, args.shard_size, args.merge_lora,
               args.overwrite, "llm" if args.llm_only else
               "projector" if args.projector_only else "llava")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
