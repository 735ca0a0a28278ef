"""Profile files: bundled profiles, fitting, importers, and clear errors on corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tropical_sched.core import ProfileFormatError, UnknownNameError
from tropical_sched.predictors import bundled_profile_names, load_profile, write_profile_file
from tropical_sched.predictors.fitting import fit_step_time, sample_features
from tropical_sched.predictors.importers import KNOWN_GPUS, KNOWN_MODELS, derive_kv_cache_tokens, import_splitwise
from tropical_sched.predictors.step_time import FEATURE_NAMES

REQUIRED = {"a100-llama2-70b-tp4", "h100-llama2-70b-tp4", "a100-opt-13b-tp1", "a100-opt-66b-tp4"}


def test_the_required_profiles_are_bundled() -> None:
    assert set(bundled_profile_names()) >= REQUIRED


@pytest.mark.parametrize("name", bundled_profile_names())
def test_bundled_profile_records_provenance_and_a_fit_error_that_matches_its_samples(name: str) -> None:
    profile = load_profile(name)
    meta = profile.metadata
    assert meta.name == name
    assert meta.source.licence
    assert meta.source.url
    assert meta.engine.name
    fit = profile.file.fit
    used = [s for s in profile.file.samples if s.used_in_fit]
    predicted = sample_features(used) @ np.array([fit.coefficients[n] for n in FEATURE_NAMES])
    measured = np.array([s.step_time_s for s in used])
    relative = np.abs(predicted - measured) / measured
    assert fit.max_relative_error == pytest.approx(relative.max(), rel=1e-6)
    assert fit.num_samples_fitted == len(used)
    assert fit.r2 > 0.95


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_refitting_the_bundled_samples_reproduces_the_coefficients(name: str) -> None:
    profile = load_profile(name)
    refit = fit_step_time(profile.file.samples, exclusion_note=profile.file.fit.exclusion_note)
    for key in FEATURE_NAMES:
        assert refit.coefficients[key] == pytest.approx(profile.file.fit.coefficients[key], rel=1e-6, abs=1e-12)


def test_kv_capacity_of_llama2_70b_tp4_on_a100() -> None:
    # (0.9 * 4 * 80 GiB - 138 GB of weights) / 320 KiB per token
    tokens = derive_kv_cache_tokens(KNOWN_MODELS["llama2-70b"], KNOWN_GPUS["a100-80gb"], 4)
    assert tokens == load_profile("a100-llama2-70b-tp4").num_kv_cache_tokens
    assert 500_000 < tokens < 550_000
    assert KNOWN_MODELS["llama2-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def _bundled_json(name: str = "a100-opt-13b-tp1") -> dict:
    from importlib import resources

    return json.loads((resources.files("tropical_sched") / "data" / "profiles" / f"{name}.json").read_text())


def test_written_profile_round_trips_with_one_sample_per_line(tmp_path: Path) -> None:
    profile = load_profile("a100-opt-13b-tp1")
    path = tmp_path / "p.json"
    write_profile_file(profile.file, path)
    assert load_profile(path).file == profile.file
    lines = path.read_text().splitlines()
    assert sum('"step_time_s"' in line for line in lines) == len(profile.file.samples)


def test_invalid_json_fails_with_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "schema_version": 1,\n  "metadata": {,\n}\n')
    with pytest.raises(ProfileFormatError, match=rf"{path}:3: not valid JSON"):
        load_profile(path)


def test_schema_error_names_the_field_the_value_and_the_line(tmp_path: Path) -> None:
    profile = load_profile("a100-opt-13b-tp1")
    path = tmp_path / "bad.json"
    write_profile_file(profile.file, path)
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"step_time_s"' in line) + 4  # the fifth sample
    lines[index] = lines[index].replace('"step_time_s": ', '"step_time_s": -', 1)
    path.write_text("\n".join(lines))
    with pytest.raises(ProfileFormatError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{index + 1}: field samples[4].step_time_s = -")
    assert "greater than 0" in message


def test_unsupported_schema_version_is_named(tmp_path: Path) -> None:
    data = _bundled_json()
    data["schema_version"] = 2
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(ProfileFormatError, match=r"v2.json:2: schema_version 2 is not supported"):
        load_profile(path)


def _line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` that contains ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if text in line)


@pytest.mark.parametrize(
    ("zeroed", "kind"),
    [
        (FEATURE_NAMES, "prefill"),
        (("const_s", "per_batched_token_s", "per_prefill_seq_s", "per_prefill_attention_pair_s"), "prefill"),
        (("const_s", "per_batched_token_s", "per_decode_seq_s", "per_decode_context_token_s"), "decode"),
    ],
)
def test_a_profile_whose_steps_take_no_time_is_refused_at_load(
    tmp_path: Path, zeroed: tuple[str, ...], kind: str
) -> None:
    """Zero step times passed the schema and then failed far away ("Slo.ttft_s must be a positive number of seconds,
    got 0.0", naming neither the file nor the field)."""
    data = _bundled_json()
    for name in zeroed:
        data["fit"]["coefficients"][name] = 0.0
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ProfileFormatError) as caught:
        load_profile(path)
    message = str(caught.value)
    line = _line_of(path, '"coefficients"')
    assert message.startswith(f"{path}:{line}: field fit.coefficients: ")
    assert f"are all 0, so a {kind} step would take no time" in message


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("fit.coefficients", "per_batched_token_s", -1e-4, "greater than or equal to 0"),
        ("kv_cache", "num_tokens", 0, "greater than or equal to 1"),
        ("metadata.model", "max_model_len", 0, "greater than or equal to 1"),
        ("metadata.hardware", "interconnect_bandwidth_bytes_per_s", 0, "greater than 0"),
    ],
)
def test_physically_meaningless_values_name_the_file_line_and_field(
    tmp_path: Path, section: str, field: str, value: float, expected: str
) -> None:
    data = _bundled_json()
    target = data
    for key in section.split("."):
        target = target[key]
    target[field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ProfileFormatError) as caught:
        load_profile(path)
    message = str(caught.value)
    line = _line_of(path, f'"{field}": {value}')
    assert message.startswith(f"{path}:{line}: field {section}.{field} = {value}")
    assert expected in message


def test_unknown_profile_lists_the_bundled_ones() -> None:
    with pytest.raises(UnknownNameError, match="unknown profile 'nope'; known: a100-llama2-70b-tp2"):
        load_profile("nope")
    with pytest.raises(UnknownNameError, match=r"no such profile file: missing\.json"):
        load_profile("missing.json")


SPLITWISE_HEADER = (
    "model,hardware,prompt_size,batch_size,token_size,peak_power,average_power,prompt_time,token_time,e2e_time,"
    "tensor_parallel\n"
)


def test_splitwise_importer_keeps_origins_and_excludes_batched_prefills(tmp_path: Path) -> None:
    rows = []
    for prompt in (128, 256, 512, 1024, 2048, 4096):
        rows.append(f"llama2-70b,a100-80gb,{prompt},1,128,1,1,{40 + 0.15 * prompt + 3e-5 * prompt**2},44,0,4")
    for batch in (2, 8, 32):
        rows.append(f"llama2-70b,a100-80gb,512,{batch},128,1,1,{200.0 * batch},{44 + 0.5 * batch},0,4")
    rows.append("llama2-70b,h100-80gb,512,1,128,1,1,99,30,0,4")  # other hardware: ignored
    path = tmp_path / "perf_model.csv"
    path.write_text(SPLITWISE_HEADER + "\n".join(rows) + "\n")
    profile = import_splitwise(path, model="llama2-70b", hardware="a100-80gb", tensor_parallel_size=4)
    assert len(profile.samples) == 18
    batched = [s for s in profile.samples if len(s.prefill_chunks) > 1]
    assert len(batched) == 3
    assert not any(s.used_in_fit for s in batched)
    assert profile.fit.num_samples_excluded == 3
    assert profile.samples[0].origin == "perf_model.csv line 2 prompt_time"
    assert profile.valid_range.max_num_prompt_tokens == 4096
    assert profile.fit.r2 > 0.99


def test_splitwise_importer_reports_a_malformed_number_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "perf_model.csv"
    path.write_text(SPLITWISE_HEADER + "llama2-70b,a100-80gb,512,1,128,1,1,oops,44,0,4\n")
    with pytest.raises(ProfileFormatError, match=r"perf_model.csv:2: malformed number"):
        import_splitwise(path, model="llama2-70b", hardware="a100-80gb", tensor_parallel_size=4)
