"""Importing a local Hugging Face checkpoint into mmjax parameters, tensor by tensor.

Each parameter is read from its safetensors file into one host buffer, cast to the
configured parameter dtype and placed straight into its target sharding with
`jax.make_array_from_callback` (each process builds only its addressable shards), then the
buffer is dropped: host memory holds one tensor beyond the imported weights at any time.
Scanned (stacked) parameters are assembled shard by shard, one layer tensor at a time.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from mmjax.hf import mapping
from mmjax.hf.config import LLAVA_ARCHS, LLM_ARCHS, architecture, from_hf
from mmjax.hf.weight_files import Checkpoint
from mmjax.models.config import LlavaConfig, LLMConfig, RuntimeConfig
from mmjax.models.factory import abstract_variables, build
from mmjax.models.llava import normalized_feature_layers
from mmjax.sharding import Rules, logical_shardings, plain, single_device_mesh

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Imported:
    """An imported checkpoint: config, module, params (sharded) and what was left unread."""

    config: object
    model: nn.Module
    params: dict
    architecture: str
    unused: list[str]
    directory: Path


def _flat(tree) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _unflat(flat: dict[str, object]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def layer_counts(cfg) -> dict[str, int]:
    """Layers per part that mmjax builds (the vision tower up to the layer LLaVA reads)."""
    if isinstance(cfg, LlavaConfig):
        return {"vision_tower": max(normalized_feature_layers(cfg)), "projector": 0,
                "language_model": cfg.llm.num_layers}
    return {"": cfg.num_layers}


def _extra_ignorable(cfg, parts: dict) -> list[str]:
    out = []
    llm = cfg.llm if isinstance(cfg, LlavaConfig) else cfg
    if isinstance(llm, LLMConfig) and llm.tie_word_embeddings:
        out.append(r"(^|\.)lm_head\.weight$")  # saved anyway by some exporters
    if isinstance(cfg, LlavaConfig):
        depth = max(normalized_feature_layers(cfg))
        prefix = re.escape(parts["vision_tower"][1])
        out.append(prefix + r"post_layernorm\.")
        out += [prefix + rf"encoder\.layers\.{i}\." for i in range(depth, cfg.vision.num_layers)]
    return out


def _read(ckpt: Checkpoint, key: str, src: mapping.Source, dtype) -> np.ndarray:
    w = src.transform(ckpt.read(key))
    return w.astype(dtype) if np.issubdtype(w.dtype, np.floating) or w.dtype.kind == "V" else w


def _place(ckpt, src: mapping.Source, shape, dtype, sharding) -> jax.Array:
    if not src.stacked:
        host = _read(ckpt, src.keys[0], src, dtype)
        arr = jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])
        del host
        return arr

    def shard(idx):
        layers = range(len(src.keys))[idx[0]]
        out = np.empty((len(layers),) + tuple(
            len(range(n)[i]) for n, i in zip(shape[1:], idx[1:])), dtype)
        for j, layer in enumerate(layers):
            out[j] = _read(ckpt, src.keys[layer], src, dtype)[idx[1:]]
        return out

    return jax.make_array_from_callback(shape, sharding, shard)


def load(directory: str | Path, rt: RuntimeConfig = RuntimeConfig(), mesh=None,
         rules: Rules | None = None, allow_pickle: bool = False) -> Imported:
    """Imports the checkpoint in `directory` onto `mesh` split by the logical-axis `rules`
    (both from config), or, with neither, onto the first device.

    LoRA adapters are not part of HF checkpoints: the import ignores `rt.lora_rank` (the
    trainer grafts freshly initialised adapters onto the imported weights)."""
    rt = dataclasses.replace(rt, lora_rank=0)
    ckpt = Checkpoint(directory, allow_pickle=allow_pickle)
    hf_cfg = ckpt.config()
    arch = architecture(hf_cfg, str(ckpt.config_path))
    cfg = from_hf(hf_cfg, ckpt.dir)
    kind = "llava" if arch in LLAVA_ARCHS else ("llm" if arch in LLM_ARCHS else "vision")
    parts = mapping.resolve_parts(kind, ckpt)
    if mesh is None:
        mesh, rules = single_device_mesh(), ()  # one device: nothing to split
    elif rules is None:
        raise ValueError("load(): a mesh needs its logical-axis rules (config "
                         "logical_axis_rules)")
    boxed = abstract_variables(cfg, rt)["params"]
    shardings = _flat(logical_shardings(boxed, mesh, rules))
    abstract = _flat(plain(boxed))
    sources = mapping.plan({p: a.shape for p, a in abstract.items()}, parts,
                           layer_counts(cfg), ckpt)
    unused = mapping.unused_keys(sources, ckpt, _extra_ignorable(cfg, parts))
    dtype = np.dtype(rt.param_dtype)
    params = {}
    for path, a in abstract.items():
        params[path] = _place(ckpt, sources[path], a.shape, dtype, shardings[path])
    if unused:
        log.info("%s: %d checkpoint tensors not used (%s ...)", ckpt.dir, len(unused),
                 ", ".join(unused[:3]))
    return Imported(cfg, build(cfg, rt), _unflat(params), arch, unused, ckpt.dir)
