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
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import transformers as tf
from PIL import Image
from safetensors.numpy import save_file

from mmjax.data.jinja import chat_template
from mmjax.data.templates import IMAGE, get_template
from mmjax.data.tokenize import ConversationEncoder
from mmjax.errors import ConfigError
from mmjax.hf import check_written, save_tokenizer
from mmjax.hf.config import hf_config_object
from mmjax.hf.writer import (
    CAUSAL_LM,
    LLAVA_PARTS,
    LLM_PARTS,
    image_processor,
    llava_config,
    model_tensors,
    parse_size,
    processor,
    tower_extras,
    write_weights,
)
from mmjax.logs import quiet_notices
from mmjax.models import anyres
from mmjax.sharding import plain
from mmjax.training import lora, model_spec
from mmjax.training.saved_run import SavedRun, parse

log = logging.getLogger("mmjax.export")


class ModuleReader:
    """A run's parameters, one module (a dict of leaves) at a time, from its checkpoint."""

    def __init__(self, run: SavedRun, step: int | None, abstract: dict, device):
        self._reader = run.reader(step)
        self.step = self._reader.step
        self._abstract, self._device, self._rt = abstract, device, run.rt
        self._cache: tuple | None = None

    def module(self, path: tuple[str, ...]) -> dict:
        """{leaf name: np.ndarray} of the module at `path` (cached: the last one read)."""
        if self._cache and self._cache[0] == path:
            return self._cache[1]
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

    def merged(self, path: tuple[str, ...]) -> dict:
        """`module(path)` with its LoRA adapters folded into the kernel (W + alpha/r A B)."""
        module = self.module(path)
        if "lora_a" not in module:
            return module
        return {k: np.asarray(v) for k, v in lora.merge(module, self._rt).items()}

    def close(self) -> None:
        self._reader.close()


def export(spec: str, out: str | Path, dtype: str = "bfloat16", shard_size: str = "5GB",
           merge_lora: bool = False, overwrite: bool = False, what: str = "llava",
           say=print) -> Path:
    """Writes the run `spec` (WORKDIR[:STEP]) to `out` as an HF directory (`what`: llava,
    llm or projector). Returns the directory."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace it")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: bfloat16, float16 or float32")
    workdir, step = parse(spec)
    if not (workdir / model_spec.MODEL_FILE).is_file():
        raise ConfigError(f"{workdir} has no {model_spec.MODEL_FILE} (not a training work dir, "
                          "or one from before runs saved their model)")
    run = SavedRun.open(workdir)
    cfg, rt, saved = run.cfg, run.rt, run.spec
    if rt.lora_rank and not merge_lora:
        raise ConfigError("this run trained LoRA adapters: pass --merge-lora to fold them "
                          "into the weights (a transformers LLaVA has no adapters)")
    abstract = plain(run.abstract_params())
    flat = {"/".join(k.key for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    reader = ModuleReader(run, step, abstract, jax.devices("cpu")[0])
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = saved.tokenizer
    try:
        if what == "projector":
            _write_projector(tmp, reader, cfg, flat)
        else:
            parts, roots = ((LLM_PARTS, ("language_model",)) if what == "llm" else
                            (LLAVA_PARTS, ("vision_tower", "projector", "language_model",
                                           "image_newline")))
            tensors = list(model_tensors(reader.merged, cfg, flat, np_dtype, parts, roots))
            if what == "llava":
                source = saved.sources.get("hf_vision") or saved.sources.get("hf_llava")
                extras = tower_extras(source, cfg, {t.key for t in tensors}, np_dtype)
                tensors += extras or []
                if extras is None:
                    say(f"note: the HF tower the run started from ({source or 'unknown'}) is "
                        "not there: transformers will initialise the vision layers above the "
                        "feature layer and the post-LayerNorm (LLaVA's outputs do not read "
                        "them)")
            write_weights(tmp, tensors, parse_size(shard_size))
            if what == "llm":
                conf = hf_config_object(cfg.llm)
                conf.architectures = [CAUSAL_LM[cfg.llm.family]]
                conf.bos_token_id, conf.eos_token_id = tokenizer.bos_token_id, \
                    tokenizer.eos_token_id
                conf.pad_token_id, conf.dtype = tokenizer.pad_token_id, dtype
                conf.save_pretrained(tmp)
                save_tokenizer(tokenizer, tmp)
            else:
                llava_config(cfg, tokenizer, dtype).save_pretrained(tmp)
                write_processor(tmp, cfg, saved, run.tc.data.image_aspect)
            tf.GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        (tmp / "mmjax_export.json").write_text(json.dumps(
            {"workdir": str(workdir.absolute()), "step": reader.step, "dtype": dtype,
             "what": what, "template": saved.template, "merged_lora": bool(rt.lora_rank)},
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


# conversations the exported processor must turn into the ids training gives them:
# (system, pairs as mmjax renders them, whether the chat messages hold the text as a string)
PROBES = (
    (None, [("<image>\nWhat is in this picture?", "")], False),
    (None, [("<image>\nWhat is this?", "A cat."), ("And the colour?", "")], False),
    ("You answer briefly.", [("<image>\nDescribe it.", "")], False),
    (None, [("<image>\nWhat is this?", "A dog."), ("Why?", "")], True),
    (None, [("Say something.", "")], False),
)
IMAGE_SUFFIXES = ("", " ")  # after each <image> in the chat template (mmjax.data.jinja)


def write_processor(out: Path, cfg, spec, aspect: str) -> str | None:
    """The processor files (image processor of the run's aspect, tokenizer, chat template)
    such that transformers' own `apply_chat_template` + processor give the prompt ids the
    run trained on: each image suffix is written, read back with AutoProcessor and checked
    on `PROBES`; the first that gives training's ids stays. Returns it (None for `plain`,
    which has no chat format); ConfigError when none does."""
    tokenizer = spec.tokenizer
    if cfg.anyres_max:
        return _write_onevision_processor(out, cfg, spec)
    if chat_template(spec.template) is None:
        _save_processor(out, processor(cfg, tokenizer, None, aspect), tokenizer)
        return None
    encoder = ConversationEncoder(tokenizer, get_template(spec.template, tokenizer),
                                  0 if cfg.anyres else cfg.image_tokens, cfg.image_token_id,
                                  1 << 30, special_token_text="keep")
    tried = []
    for suffix in IMAGE_SUFFIXES:
        _save_processor(out, processor(cfg, tokenizer, chat_template(spec.template, suffix),
                                       aspect), tokenizer)
        back = tf.AutoProcessor.from_pretrained(str(out), local_files_only=True)
        diff = _first_difference(back, encoder, cfg)
        if diff is None:
            return suffix
        tried.append(f"with {suffix!r} after <image>: {diff}")
    raise ConfigError(f"the exported processor and chat template cannot give the prompt ids "
                      f"this run trained on (template {spec.template}, "
                      f"{type(tokenizer).__name__}): " + "; ".join(tried))


def _write_onevision_processor(out: Path, cfg, spec) -> None:
    """OneVision: its image processor (the grids), the tokenizer and the chat template.
    LlavaOnevisionProcessor also needs a video processor, which transformers builds only
    with torchvision: it is written when torchvision is there, else said on the console."""
    tokenizer = spec.tokenizer
    images = image_processor(cfg, "anyres")
    images.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    template = chat_template(spec.template)
    if template:
        (out / "chat_template.jinja").write_text(template)
    try:
        video = tf.LlavaOnevisionVideoProcessor(
            size={"height": cfg.vision.image_size, "width": cfg.vision.image_size},
            image_mean=list(cfg.vision.image_mean), image_std=list(cfg.vision.image_std))
    except ImportError as e:
        log.warning("OneVision export: no video processor written (%s); the image processor, "
                    "tokenizer and chat template are", str(e).splitlines()[0])
        return None
    tf.LlavaOnevisionProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=video,
        num_image_tokens=cfg.view_tokens, vision_feature_select_strategy=cfg.vision_feature_select,
        chat_template=template, vision_aspect_ratio=f"anyres_max_{cfg.anyres_max}"
    ).save_pretrained(str(out))
    return None


def _save_processor(out: Path, proc, tokenizer) -> None:
    proc.save_pretrained(str(out))
    # also the per-component file older transformers and vLLM read
    proc.image_processor.save_pretrained(str(out))
    check_written(tokenizer, out)


def _first_difference(proc, encoder, cfg) -> str | None:
    """None when the processor gives the encoder's prompt ids on every probe (square images
    of the tower's size)."""
    size = cfg.vision.image_size
    tokens = anyres.feature_tokens(size, size, cfg.image_grid_pinpoints, size,
                                   cfg.vision.patch_size) if cfg.anyres else cfg.image_tokens
    for system, pairs, as_string in PROBES:
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in pairs:
            text = q.replace(IMAGE, "").strip()
            content = q if as_string else (
                [{"type": "image"}] * q.count(IMAGE) + [{"type": "text", "text": text}])
            messages.append({"role": "user", "content": content})
            if a:
                messages.append({"role": "assistant", "content": a})
        rendered = proc.apply_chat_template(messages, add_generation_prompt=True)
        n = sum(q.count(IMAGE) for q, _ in pairs)
        images = [Image.new("RGB", (size, size))] * n or None
        theirs = proc(images=images, text=rendered, return_tensors="np")["input_ids"][0]
        ours = encoder.prompt_ids(system, pairs, [tokens] * n)
        if list(theirs) != list(ours):
            k = next((i for i, (x, y) in enumerate(zip(theirs, ours)) if x != y),
                     min(len(theirs), len(ours)))
            tok = encoder.tokenizer
            return (f"{rendered!r} gives {len(theirs)} ids, training {len(ours)}; from id {k}: "
                    f"{tok.convert_ids_to_tokens(list(theirs[k:k + 4]))} against "
                    f"{tok.convert_ids_to_tokens(list(ours[k:k + 4]))}")
    return None


def _write_projector(out: Path, reader: ModuleReader, cfg, flat: dict) -> None:
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
    save_file(tensors, str(out / "mm_projector.safetensors"), metadata={"format": "pt"})
    try:
        import torch  # optional (the test extra): LLaVA's loader reads the .bin
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
    quiet_notices()
    try:
        export(args.checkpoint, args.out, args.dtype, args.shard_size, args.merge_lora,
               args.overwrite, "llm" if args.llm_only else
               "projector" if args.projector_only else "llava")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
