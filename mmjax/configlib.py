"""Config files: `path/to/file.py[:arg]` with `get_config(arg)`, plus `--config.x=y` overrides;
and the one translation from a ConfigDict to typed dataclasses.

    c = load("configs/stage2.py:llava_1b", ["--config.data.workers=4"])
    tc = typed(TrainConfig, c)            # every section typed and checked

The dataclasses are the schema: `defaults(cls)` makes a config section from a dataclass (every
field, with its default), and `typed(cls, section)` reads one back, naming unknown fields with
the valid ones and values of the wrong type (`Literal` fields name their choices). Fields whose
metadata says `derived` are not in the config; the entry point fills them. This module knows
no section: `mmjax.training.config` holds the training config's dataclasses and its reference
(the README's "Configuration reference").
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path

import ml_collections

from mmjax.errors import ConfigError


# --------------------------------------------------------------------------- config files
def load(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Loads `file.py[:arg]` and applies `key.path=value` overrides (values as Python literals)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not --config.FIELD=VALUE")
        key = key.removeprefix("--config.").removeprefix("config.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string
        node = cfg
        *parents, last = key.split(".")
        for depth, p in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise ConfigError(f"unknown config field {'.'.join(parents[:depth + 1])!r}; "
                                  f"valid: {_valid(node)}")
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            raise ConfigError(f"unknown config field {key!r}; valid: {_valid(node)}")
        current = node[last]
        if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
            value = type(current)(value)  # (a, b) and [a, b] mean the same here
        try:
            node[last] = value
        except TypeError as e:
            raise ConfigError(f"--config.{key}: {value!r} has the wrong type for a field "
                              f"holding {current!r}") from e
    return cfg


def _valid(node) -> str:
    return ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "-"


def configs_dir() -> Path:
    """The project's `configs/` folder (installed beside mmjax as the `configs` package), for
    commands that load its files by path; located, not imported (configs sit above every
    module of mmjax)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the configs/ folder is not installed beside mmjax (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


# --------------------------------------------------------------------------- the schema
def settable_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config dataclass that the config holds (not the derived ones)."""
    return [f for f in dataclasses.fields(cls) if "derived" not in f.metadata]


def field_default(f: dataclasses.Field):
    """A dataclass field's default value (its factory's product), None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _to_config_value(value):
    if dataclasses.is_dataclass(value):
        return defaults(type(value), value)
    if isinstance(value, (tuple, list)):
        return [_to_config_value(v) for v in value]
    if isinstance(value, dict):
        return ml_collections.ConfigDict({k: _to_config_value(v) for k, v in value.items()})
    return value


def defaults(cls, instance=None) -> ml_collections.ConfigDict:
    """A config section with every settable field of `cls` (values from `instance`, else the
    defaults). Sequences are lists in the ConfigDict; `typed` makes them tuples again."""
    return ml_collections.ConfigDict({
        f.name: _to_config_value(getattr(instance, f.name) if instance is not None
                                 else field_default(f))
        for f in settable_fields(cls)})


def typed(cls, section, where: str = ""):
    """The dataclass `cls` from a config section (ConfigDict or dict), checked field by field."""
    if not hasattr(section, "items"):
        raise ConfigError(f"{where or 'the config'} must be a section (a dict of fields), "
                          f"got {section!r}")
    items = dict(section.items())
    fields = {f.name: f for f in settable_fields(cls)}
    unknown = sorted(set(items) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(_join(where, k) for k in unknown)}; "
                          f"valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in items.items()}
    missing = [_join(where, n) for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set")
    return cls(**kwargs)


def from_saved(cls, data: dict):
    """The dataclass `cls` from its `dataclasses.asdict` form (a run's `config.json`): the
    fields the trainer derived are dropped, the rest checked as any config."""
    return typed(cls, _settable(cls, data))


def _settable(tp, value):
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        derived = {f.name for f in dataclasses.fields(tp)} - {
            f.name for f in settable_fields(tp)}
        return {k: (_settable(hints[k], v) if k in hints else v) for k, v in value.items()
                if k not in derived}
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        return _settable(classes[0], value) if classes else value
    if typing.get_origin(tp) is tuple and args and isinstance(value, list):
        return [_settable(args[0], v) for v in value]
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return tuples(value)
    if dataclasses.is_dataclass(tp):
        return typed(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} is {value!r}; one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} items, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not hasattr(value, "items"):
            raise ConfigError(f"{where} must be a dict, got {value!r}")
        return {_convert(args[0], k, where): _convert(args[1], v, f"{where}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be True or False, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: config type {tp} is not supported")


def tuples(value):
    """Lists -> tuples, recursively (a config's lists as hashable values: logical-axis
    rules as the sharding functions take them)."""
    if isinstance(value, (list, tuple)):
        return tuple(tuples(v) for v in value)
    return value


# --------------------------------------------------------------------------- reference
def field_docs(cls) -> dict[str, str]:
    """Field name -> its trailing comment in the dataclass source (the field's meaning)."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs
