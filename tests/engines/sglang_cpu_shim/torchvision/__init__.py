"""Import stand-in for ``torchvision`` (tests only; never installed).

PyPI's torchvision builds that fit torch 2.13.0+cpu fail to import (``operator torchvision::nms does not exist``).
SGLang and transformers import torchvision submodules at start-up for image code that a text model never runs.
Here every ``torchvision.*`` submodule imports, and every name in it is a placeholder that raises only when called.
"""

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.0.0+tropical-cpu-shim"


class Placeholder:
    """Any torchvision name; attributes are placeholders too, calling one raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "Placeholder":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self._name} is not available in the CPU test shim")


def _module_getattr(module_name: str) -> Any:
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder(f"{module_name}.{name}")

    return __getattr__


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


__getattr__ = _module_getattr(__name__)
sys.meta_path.insert(0, _SubmoduleFinder())
