"""Config files: `path/to/file.py[:arg]` with `get_config(arg)`, plus `--config.x=y` overrides.

The entry points resolve a config once here and hand typed values (RuntimeConfig, mesh axis
sizes, logical-axis rules, a model config) to library code.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from mmjax.models import presets
from mmjax.models.config import RuntimeConfig


def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Loads `file.py[:arg]` and applies `key.path=value` overrides (values as Python literals)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        key = key.removeprefix("--config.").removeprefix("config.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if last not in node:
            raise KeyError(f"unknown config field {key!r}")
        node[last] = value
    return cfg


def runtime(cfg: ml_collections.ConfigDict) -> RuntimeConfig:
    """The runtime section, plus the LoRA adapters when `lora.enabled`."""
    fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    values = {k: v for k, v in cfg.runtime.items() if k in fields}
    lora = cfg.get("lora")
    if lora is not None and lora.enabled:
        values.update(lora_rank=int(lora.rank), lora_alpha=float(lora.alpha),
                      lora_dropout=float(lora.dropout), lora_targets=tuple(lora.targets))
    return RuntimeConfig(**values)


def distributed(cfg: ml_collections.ConfigDict):
    from mmjax.distributed import DistributedConfig

    d = cfg.get("distributed")
    return DistributedConfig(**dict(d.items())) if d is not None else DistributedConfig()


def rules(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, object], ...]:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in cfg.logical_axis_rules)


def mesh_axes(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    return dict(cfg.mesh.items())


def mesh_dcn(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """The DCN (across slices / hosts) part of the mesh; all 1 when not configured."""
    return dict(cfg.mesh_dcn.items()) if "mesh_dcn" in cfg else {}


def make_mesh(cfg: ml_collections.ConfigDict):
    from mmjax.sharding import make_mesh as _make

    granule = cfg.get("mesh_granule", "auto")
    return _make(mesh_axes(cfg), dcn_sizes=mesh_dcn(cfg), granule=granule)


def model(cfg: ml_collections.ConfigDict):
    return presets.get(cfg.model)
