"""Import stand-in for ``sgl_kernel`` on machines without a GPU (tests only; never installed).

PyPI's ``sglang-kernel`` wheels are CUDA builds that fail to import without ``libcuda.so.1``, and SGLang imports
the package at start-up even on its CPU engine. For Llama with ``--attention-backend torch_native`` on a CPU
without Intel AMX, SGLang's CPU code paths fall back to native torch and call none of these kernels; any name is
importable here and raises ``NotImplementedError`` only if it is called. See docs/sglang.md.
"""

from typing import Any

__version__ = "0.0.0+tropical-cpu-shim"


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{self._name} is not available in the CPU test shim")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
