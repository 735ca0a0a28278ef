"""``python -m tropical_sched.profiling.tiny_model``: its options and its error when a dependency is missing.

Building the model needs torch; the engine tests (tests/test_vllm_engine.py) build it with the command of
docs/vllm.md. Here: what runs without torch, plus a build where torch, transformers and tokenizers are installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tropical_sched.core.errors import UnknownNameError
from tropical_sched.profiling import tiny_model

DEPENDENCIES = ("transformers", "tokenizers", "torch")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-heads", "3"], "--num-heads 3 must divide --hidden-size 128"),
        (["--num-kv-heads", "3"], "--num-kv-heads 3 must divide --num-heads 4"),
        (["--num-layers", "0"], "--num-layers must be at least 1"),
        (["--vocab-size", "100"], "--vocab-size must be at least 259"),
    ],
)
def test_bad_options_stop_before_building(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny_model.main(["--out", str(tmp_path / "m"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("blocked", [("torch",), ("transformers",), DEPENDENCIES], ids=lambda b: "+".join(b))
def test_a_missing_dependency_gives_one_line_naming_how_to_install_it(
    blocked: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError(name=name)
    missing = set(blocked) | {name for name in DEPENDENCIES if importlib.util.find_spec(name) is None}
    assert tiny_model.main(["--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m tropical_sched.profiling.tiny_model: the tiny model needs ")
    assert ("pip install 'tropical-sched[tiny-model]'" in err) == bool(missing - {"torch"})
    assert ("torch: install the build that fits this machine" in err) == ("torch" in missing)
    for name in DEPENDENCIES:
        assert (name in err) == (name in missing), name
    assert not (tmp_path / "m").exists()


def test_the_module_runs_as_a_script_and_writes_the_model_it_was_asked_for(tmp_path: Path) -> None:
    for name in DEPENDENCIES:
        pytest.importorskip(name)
    out = tmp_path / "small"
    sizes = ["--hidden-size", "64", "--num-layers", "3", "--num-heads", "2", "--num-kv-heads", "1"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tropical_sched.profiling.tiny_model",
            "--out",
            str(out),
            *sizes,
            "--max-position-embeddings",
            "1024",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 64
    assert config["num_hidden_layers"] == 3
    assert config["num_attention_heads"] == 2
    assert config["num_key_value_heads"] == 1
    assert config["max_position_embeddings"] == 1024
    assert config["vocab_size"] == 352
    assert (out / "tokenizer.json").is_file()


def test_the_presets_are_the_engine_tests_model_and_the_served_regime_model() -> None:
    import inspect
    from types import SimpleNamespace

    from tropical_sched.profiling.vllm_inprocess import estimate_num_params

    defaults = {
        name: p.default
        for name, p in inspect.signature(tiny_model.build_tiny_llama).parameters.items()
        if name in tiny_model.PRESETS["tiny"].sizes()
    }
    assert tiny_model.PRESETS["tiny"].sizes() == defaults  # the tiny model stays what the engine tests build

    def num_params(preset: str) -> float:
        sizes = tiny_model.PRESETS[preset]
        return estimate_num_params(
            SimpleNamespace(
                hidden_size=sizes.hidden_size,
                num_attention_heads=sizes.num_heads,
                num_key_value_heads=sizes.num_kv_heads,
                intermediate_size=2 * sizes.hidden_size,
                num_hidden_layers=sizes.num_layers,
                vocab_size=352,
            )
        )

    assert tiny_model.PRESETS["served"].sizes() == {
        "hidden_size": 256,
        "num_layers": 32,
        "num_heads": 4,
        "num_kv_heads": 2,
    }
    assert num_params("served") == pytest.approx(19e6, rel=0.02)
    assert num_params("tiny") == pytest.approx(0.39e6, rel=0.02)


@pytest.mark.parametrize(
    ("args", "sizes"),
    [
        ([], {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}),
        (["--preset", "served"], {"hidden_size": 256, "num_layers": 32, "num_heads": 4, "num_kv_heads": 2}),
        # a size option overrides the preset's, the others stay
        (
            ["--preset", "served", "--num-layers", "4"],
            {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2},
        ),
    ],
)
def test_the_command_builds_the_preset_with_the_sizes_given(
    args: list[str], sizes: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[dict[str, object]] = []
    monkeypatch.setattr(tiny_model, "build_tiny_llama", lambda path, **options: built.append(options) or path)
    assert tiny_model.main(["--out", str(tmp_path / "m"), *args]) == 0
    assert {name: built[0][name] for name in sizes} == sizes


def test_an_unknown_preset_is_refused_with_the_known_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny_model.main(["--out", str(tmp_path / "m"), "--preset", "huge"])
    assert exit_info.value.code == 2
    assert "--preset: invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(UnknownNameError, match="unknown model preset 'huge'; known: served, tiny"):
        tiny_model.build_preset(tmp_path / "m", "huge")
    built: list[dict[str, object]] = []
    monkeypatch.setattr(tiny_model, "build_tiny_llama", lambda path, **options: built.append(options) or path)
    assert tiny_model.build_preset(tmp_path / "m", "served", seed=3) == tmp_path / "m"
    assert built == [{**tiny_model.PRESETS["served"].sizes(), "seed": 3}]
    assert not (tmp_path / "m").exists()
