"""Library code takes the logical-axis rules explicitly: no default stands in for config."""
import importlib
import inspect
import pkgutil

import mmjax


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
