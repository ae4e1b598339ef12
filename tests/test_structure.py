"""The shape of the code: imports go down the layers of STYLE.md, at the top of each file, with
no cycle; library code takes the logical-axis rules explicitly; config dataclasses name
their closed sets of values.

Layers, bottom to top: leaf modules (errors, logs, config schema, sharding, batch,
distributed) -> models -> data, hf (siblings: neither imports the other) -> training ->
inference -> evaluation, serving (siblings) -> commands (train, aot, demo, evaluate, generate,
chat, predict, serve, export, data_pipelines) -> `python -m` dispatchers and benchmarks (they
run or measure the commands) -> configs/. A module imports from lower layers, or from its
own package; a command from lower layers only.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import typing
from pathlib import Path

import mmjax

ROOT = Path(__file__).resolve().parents[1]
OWN = ("mmjax", "configs", "data_pipelines")

# (rank, group) by module-name prefix; the longest matching prefix decides
LAYERS = {
    "mmjax": (0, "leaf"),  # mmjax/__init__ and the leaf modules listed below
    "mmjax.errors": (0, "leaf"), "mmjax.logs": (0, "leaf"), "mmjax.configlib": (0, "leaf"),
    "mmjax.sharding": (0, "leaf"), "mmjax.batch": (0, "leaf"),
    "mmjax.distributed": (0, "leaf"), "mmjax.assets": (0, "leaf"),
    "mmjax.compile_cache": (0, "leaf"),
    "mmjax.models": (1, "models"),
    "mmjax.data": (2, "data"), "mmjax.hf": (2, "hf"),
    "mmjax.training": (3, "training"),
    "mmjax.inference": (4, "inference"),
    "mmjax.evaluation": (5, "evaluation"),
    "mmjax.serving": (5, "serving"),  # beside evaluation: neither imports the other
    # commands: each its own group (one command does not import another)
    **{f"mmjax.{c}": (6, c) for c in ("train", "aot", "demo", "evaluate", "generate", "chat",
                                      "predict", "serve", "export")},
    "mmjax.data.layout": (6, "layout"), "data_pipelines": (6, "data_pipelines"),
    # above the commands: what runs or measures them
    "mmjax.hf.__main__": (7, "dispatch"), "mmjax.benchmarks": (7, "benchmarks"),
    "configs": (8, "configs"),
}

# In-function imports of project modules that are allowed, with why (none: every project
# import sits at the top of its file).
ALLOWED_INNER: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for top in OWN:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import name refers to (a name imported from a package resolves
    to the submodule when there is one, else to the package)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    while parts:
        key = ".".join(parts)
        if key in LAYERS:
            return LAYERS[key]
        parts.pop()
    raise AssertionError(f"{module} has no layer in tests/test_structure.py")


def _imports():
    """(importer, imported project module, line, inside a function?) for every import."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        inner = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner |= {id(n) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in OWN:
                    continue
                target = _resolve(name)
                if target is not None and target != module:
                    yield module, target, node.lineno, id(node) in inner


EDGES = list(_imports())


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_project_import_inside_a_function():
    inner = [f"{m}:{line} imports {t}" for m, t, line, is_inner in EDGES
             if is_inner and (m, t) not in ALLOWED_INNER]
    assert not inner, "project imports belong at the top of the file:\n" + "\n".join(inner)


def test_imports_go_down_the_layers():
    upward = []
    for m, t, line, _ in EDGES:
        (rank_m, group_m), (rank_t, group_t) = _layer(m), _layer(t)
        if rank_t < rank_m or group_m == group_t:
            continue
        upward.append(f"{m}:{line} ({group_m}) imports {t} ({group_t})")
    assert not upward, "imports that do not go down the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, t, _, _ in EDGES:
        graph[m].add(t)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above flag what they should: a models module importing training."""
    assert _layer("mmjax.models.llm")[0] < _layer("mmjax.training.step")[0]
    assert _layer("mmjax.data.pipeline") == (2, "data") and _layer("mmjax.hf.loader") == (
        2, "hf")
    assert _layer("mmjax.hf.__main__")[0] > _layer("mmjax.export")[0]
    assert any(t == "mmjax.models.llm" for m, t, _, _ in EDGES if m == "mmjax.models.llava")


# --------------------------------------------------------------------------- library habits


def _public_callables():
    for info in pkgutil.walk_packages(mmjax.__path__, "mmjax."):
        if info.name.endswith("__main__") or ".benchmarks." in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != info.name:
                continue
            if inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj
            elif inspect.isclass(obj):
                for m_name, m in vars(obj).items():
                    if inspect.isfunction(m):
                        yield f"{info.name}.{name}.{m_name}", m


def test_no_library_function_defaults_the_rules():
    checked, defaulted = 0, []
    for name, fn in _public_callables():
        param = inspect.signature(fn).parameters.get("rules")
        if param is None:
            continue
        checked += 1
        # None is allowed only where it means "no mesh either" (mmjax.hf.load: one device)
        if param.default is not inspect.Parameter.empty and param.default is not None:
            defaulted.append(name)
    assert checked >= 5 and not defaulted, defaulted


def _config_classes():
    from mmjax.training.config import TrainConfig

    seen, todo = set(), [TrainConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for hint in typing.get_type_hints(cls).values():
            for t in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(t):
                    todo.append(t)
    return seen


# str fields whose values are open: paths, names, free text, and patterns checked at start
OPEN_STR_FIELDS = {
    "TrainConfig": {"model", "tokenizer", "compile_cache_dir"},
    "InitConfig": {"hf_llava", "hf_vision", "hf_llm", "stage1_checkpoint"},
    "SourceConfig": {"path", "image_root", "split", "name"},
    "BenchmarkSpec": {"data", "split", "variant", "image_root", "tag"},
    "MetricsConfig": {"wandb_project", "wandb_name"},
    "DistributedConfig": {"coordinator_address"},
    "ComposeConfig": {"projector"},  # linear | mlpNx_gelu for any N (checked at start)
}


def test_config_fields_with_closed_sets_are_literals():
    """Every str field of every training-config section is open (a path or a name) or a
    Literal, so a typo is named at start, before any weight loads."""
    loose = []
    for cls in _config_classes():
        for name, hint in typing.get_type_hints(cls).items():
            if hint is str and name not in OPEN_STR_FIELDS.get(cls.__name__, set()):
                loose.append(f"{cls.__name__}.{name}")
    assert not loose, loose


def test_benchmark_names_match_the_benchmarks():
    from mmjax.evaluation import benchmarks
    from mmjax.training.config import BenchmarkName

    assert set(typing.get_args(BenchmarkName)) == set(benchmarks.BENCHMARKS)
