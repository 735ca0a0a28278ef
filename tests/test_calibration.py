"""Online calibration (predictors/calibration.py) and the profile schema's serving section: the calibrated model
starts at the profile, converges to the engine it observes, resists outliers, keeps its clamps, and never does
worse than a profile that is right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropical_sched.core.errors import ConfigError, ProfileFormatError
from tropical_sched.predictors import (
    FEATURE_NAMES,
    CalibrationConfig,
    HopCalibrator,
    InstanceCalibration,
    Profile,
    ProfileFile,
    ServingOverheads,
    StepTimeCalibrator,
    StepTimeCoefficients,
    StepTimeModel,
    calibrated_profile_file,
    load_profile,
    served_step_time,
    step_features,
    time_scaled,
    write_profile_file,
)
from tropical_sched.predictors.calibration import _box_qp

BASE = load_profile("a100-llama2-70b-tp4")
TINY = load_profile("cpu-tiny-llama")  # every coefficient > 0


def _steps(rng: np.random.Generator, n: int) -> list[tuple[float, ...]]:
    """Features of ``n`` steps like a served engine's: decode-only batches, lone prefills, and mixed steps."""
    out = []
    for _ in range(n):
        kind = rng.random()
        decodes = int(rng.integers(1, 48))
        context = decodes * int(rng.integers(64, 2048))
        prompt = int(rng.integers(32, 2048))
        if kind < 0.5:
            out.append(step_features(decodes, context))
        elif kind < 0.85:
            out.append(step_features(0, 0, [(0, prompt)]))
        else:
            out.append(step_features(decodes, context, [(int(rng.integers(0, 1024)), prompt)]))
    return out


def _scaled_model(model: StepTimeModel, scales: tuple[float, ...]) -> StepTimeModel:
    values = [c * s for c, s in zip(model.coefficients.as_tuple(), scales, strict=True)]
    return StepTimeModel(
        StepTimeCoefficients(**dict(zip(FEATURE_NAMES, values, strict=True))), model.valid_range, "truth"
    )


def _predict(model: StepTimeModel, features: tuple[float, ...]) -> float:
    return sum(c * x for c, x in zip(model.coefficients.as_tuple(), features, strict=True))


def _feed(
    calibrator: StepTimeCalibrator,
    truth: StepTimeModel,
    rng: np.random.Generator,
    n: int,
    noise: float,
) -> None:
    for features in _steps(rng, n):
        calibrator.observe(features, _predict(truth, features) * math.exp(rng.normal(0.0, noise)))


def _max_relative_error(model: StepTimeModel, truth: StepTimeModel, rng: np.random.Generator) -> float:
    return max(abs(_predict(model, f) / _predict(truth, f) - 1) for f in _steps(rng, 300))


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("half_life_samples", 0.0),
        ("prior_weight", -1.0),
        ("min_ratio", 0.0),
        ("min_ratio", 1.5),
        ("max_ratio", 0.5),
        ("max_ratio", math.inf),
        ("outlier_threshold", 1.0),
        ("min_samples", 0),
        ("hop_reference_s", math.nan),
        ("num_recent", 0),
    ],
)
def test_a_config_out_of_range_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"CalibrationConfig.{field}"):
        CalibrationConfig(**{field: value})  # type: ignore[arg-type]


def test_the_forgetting_factor_halves_a_weight_over_the_half_life() -> None:
    config = CalibrationConfig(half_life_samples=100)
    assert config.forgetting_factor**100 == pytest.approx(0.5)


# -- the estimator -----------------------------------------------------------------------------------------------


def _box_problem(seed: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random strictly convex box QP: (hessian, linear, lower, upper)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(size + 2, size))
    linear = rng.normal(size=size) * 10
    lower = rng.uniform(-2, 0, size)
    return a.T @ a + 1e-3 * np.eye(size), linear, lower, lower + rng.uniform(0.01, 3, size)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 7))
def test_the_box_qp_solution_meets_the_optimality_conditions(seed: int, size: int) -> None:
    hessian, linear, lower, upper = _box_problem(seed, size)
    x = _box_qp(hessian, linear, lower, upper)
    assert np.all(x >= lower - 1e-12)
    assert np.all(x <= upper + 1e-12)
    gradient = hessian @ x - linear
    scale = 1e-7 * (1 + np.abs(linear).max())
    inside = (x > lower + 1e-9) & (x < upper - 1e-9)
    assert np.all(np.abs(gradient[inside]) <= scale)
    assert np.all(gradient[x <= lower + 1e-9] >= -scale)  # at a lower bound, the objective rises inwards
    assert np.all(gradient[x >= upper - 1e-9] <= scale)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 7), hint_seed=st.integers(0, 2**32 - 1))
def test_a_warm_started_box_qp_finds_the_same_minimizer(seed: int, size: int, hint_seed: int) -> None:
    """Any active-set hint (right, wrong or partly right) gives the minimizer the cold start finds."""
    from tropical_sched.predictors.calibration import _active_bounds

    hessian, linear, lower, upper = _box_problem(seed, size)
    cold = _box_qp(hessian, linear, lower, upper)
    right = _active_bounds(cold, lower, upper)
    assert np.allclose(_box_qp(hessian, linear, lower, upper, right), cold, rtol=1e-9, atol=1e-9)
    guess = np.random.default_rng(hint_seed).integers(-1, 2, size)
    assert np.allclose(_box_qp(hessian, linear, lower, upper, guess), cold, rtol=1e-9, atol=1e-9)


# -- step times --------------------------------------------------------------------------------------------------


def test_the_model_is_the_prior_until_min_samples_observations_are_in() -> None:
    """The first min_samples observations of a kind (here decode steps) are judged together, then used."""
    calibrator = StepTimeCalibrator(TINY.step_time, CalibrationConfig(min_samples=10))
    truth = _scaled_model(TINY.step_time, (3.0,) * 6)
    for decodes in range(1, 10):
        features = step_features(decodes, 300 * decodes)
        assert calibrator.observe(features, _predict(truth, features))
        assert calibrator.model is TINY.step_time
    assert calibrator.observe(step_features(10, 3000), _predict(truth, step_features(10, 3000)))
    assert calibrator.num_samples == 10
    assert calibrator.model is not TINY.step_time
    assert calibrator.model.valid_range == TINY.step_time.valid_range


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), noise=st.floats(0.0, 0.1))
def test_with_the_profile_right_the_calibrated_model_is_never_worse_on_held_out_steps(seed: int, noise: float) -> None:
    """Observations drawn from the profile itself, with lognormal noise of up to 10%: on held-out observations,
    the calibrated model errs no more than the profile, beyond the noise; and it strays from the profile by no more
    than the noise."""
    rng = np.random.default_rng(seed)
    profile = TINY.step_time
    calibrator = StepTimeCalibrator(profile)
    _feed(calibrator, profile, rng, 300, noise)
    held_out = [(f, _predict(profile, f) * math.exp(rng.normal(0.0, noise))) for f in _steps(rng, 300)]
    calibrated_error = np.mean([abs(_predict(calibrator.model, f) / t - 1) for f, t in held_out])
    profile_error = np.mean([abs(_predict(profile, f) / t - 1) for f, t in held_out])
    assert calibrated_error <= profile_error + 0.1 * noise + 0.002
    assert _max_relative_error(calibrator.model, profile, rng) <= noise + 0.01


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.1, 10.0),
    spread=st.lists(st.floats(0.5, 2.0), min_size=6, max_size=6),
    per_term=st.booleans(),
)
def test_an_engine_off_the_profile_is_learned_within_10_percent_in_300_observations(
    seed: int, scale: float, spread: list[float], per_term: bool
) -> None:
    """The engine runs the profile scaled by k in [0.1, 10], every term alike or each term by k times its own
    factor in [0.5, 2] (within the default clamps, 0.05x-20x); after 300 observations with 3% noise, every
    held-out step is predicted within 10%."""
    rng = np.random.default_rng(seed)
    scales = tuple(scale * s for s in spread) if per_term else (scale,) * 6
    truth = _scaled_model(TINY.step_time, scales)
    calibrator = StepTimeCalibrator(TINY.step_time)
    _feed(calibrator, truth, rng, 300, 0.03)
    assert _max_relative_error(calibrator.model, truth, rng) <= 0.10


@pytest.mark.parametrize(
    "scales",
    [
        (1.0, 1.0, 3.0, 1.0, 1.0, 1.0),
        (0.3, 3.0, 1.0, 3.0, 0.3, 1.0),
        (5.0, 0.5, 5.0, 0.5, 5.0, 0.5),
        (10.0, 0.1, 1.0, 5.0, 0.2, 3.0),
    ],
)
def test_terms_off_the_profile_in_opposite_directions_are_learned_within_10_percent(scales: tuple[float, ...]) -> None:
    """Terms off by factors up to 100 apart. How fast such a mix is learned depends on how well the observed
    steps separate the terms: const_s and per_prefill_seq_s only differ between decode and prefill steps, and a
    term the observations barely separate follows the common scale (the prior). Over random mixes of factors in
    [0.1, 10] per term, 300 observations reach 10% about 98 times in 100; the slowest are alternating patterns
    such as (0.5, 5, 0.5, 5, 0.5, 5), still 8-9% off after 600 (a prefill's per_prefill_seq_s, 10x below the
    common scale, is rarely told apart from const_s)."""
    rng = np.random.default_rng(11)
    truth = _scaled_model(TINY.step_time, scales)
    calibrator = StepTimeCalibrator(TINY.step_time)
    _feed(calibrator, truth, rng, 300, 0.03)
    assert _max_relative_error(calibrator.model, truth, rng) <= 0.10


def test_terms_the_profile_fitted_as_zero_stay_zero() -> None:
    calibrator = StepTimeCalibrator(BASE.step_time)  # per_prefill_seq_s is 0 in this profile
    _feed(calibrator, _scaled_model(BASE.step_time, (10.0,) * 6), np.random.default_rng(1), 200, 0.02)
    assert calibrator.model.coefficients.per_prefill_seq_s == 0.0
    assert calibrator.model.coefficients.const_s == pytest.approx(10 * BASE.step_time.coefficients.const_s, rel=0.1)


def test_single_huge_outliers_are_rejected_and_move_the_model_little() -> None:
    rng = np.random.default_rng(2)
    profile = TINY.step_time
    calibrator = StepTimeCalibrator(profile)
    _feed(calibrator, profile, rng, 200, 0.02)
    before = calibrator.model
    decode = step_features(8, 8 * 500)
    assert not calibrator.observe(decode, 100 * _predict(profile, decode))  # a stalled step
    assert not calibrator.observe(decode, 0.01 * _predict(profile, decode))  # a burst of merged tokens
    assert calibrator.num_rejected >= 2
    _feed(calibrator, profile, rng, 5, 0.02)
    assert _max_relative_error(calibrator.model, before, rng) <= 0.01


def test_an_outlier_among_the_first_observations_does_not_become_the_reference() -> None:
    rng = np.random.default_rng(3)
    profile = TINY.step_time
    calibrator = StepTimeCalibrator(profile, CalibrationConfig(min_samples=10))
    steps = [
        step_features(int(d), int(d) * int(c))
        for d, c in zip(rng.integers(1, 32, 10), rng.integers(64, 2000, 10), strict=True)
    ]
    for index, features in enumerate(steps):
        calibrator.observe(features, _predict(profile, features) * (50.0 if index == 3 else 1.0))
    assert calibrator.num_samples == 9
    assert calibrator.num_rejected == 1
    assert _max_relative_error(calibrator.model, profile, rng) <= 0.02


def test_a_lasting_change_of_the_engine_is_followed_despite_the_outlier_gate() -> None:
    rng = np.random.default_rng(4)
    profile = TINY.step_time
    calibrator = StepTimeCalibrator(profile, CalibrationConfig(half_life_samples=50))
    _feed(calibrator, profile, rng, 200, 0.02)
    slower = _scaled_model(profile, (3.0,) * 6)
    _feed(calibrator, slower, rng, 400, 0.02)  # 8 half-lives
    assert _max_relative_error(calibrator.model, slower, rng) <= 0.10


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log_factors=st.lists(st.floats(-12.0, 12.0), min_size=20, max_size=60),
)
def test_the_clamps_hold_whatever_is_observed(seed: int, log_factors: list[float]) -> None:
    """Whatever times are observed (here up to e^12 times off the profile), every calibrated coefficient stays
    within [min_ratio, max_ratio] times the prior's, and >= 0."""
    config = CalibrationConfig(min_ratio=0.2, max_ratio=5.0, min_samples=3)
    calibrator = StepTimeCalibrator(TINY.step_time, config)
    rng = np.random.default_rng(seed)
    for features, log_factor in zip(_steps(rng, len(log_factors)), log_factors, strict=True):
        calibrator.observe(features, _predict(TINY.step_time, features) * math.exp(log_factor))
        for ratio in calibrator.ratios:
            assert config.min_ratio - 1e-9 <= ratio <= config.max_ratio + 1e-9
    for value, prior in zip(
        calibrator.model.coefficients.as_tuple(), TINY.step_time.coefficients.as_tuple(), strict=True
    ):
        assert config.min_ratio * prior * (1 - 1e-9) <= value <= config.max_ratio * prior * (1 + 1e-9)


def test_an_engine_beyond_the_clamps_is_met_at_the_clamp() -> None:
    config = CalibrationConfig(max_ratio=20.0)
    calibrator = StepTimeCalibrator(TINY.step_time, config)
    _feed(calibrator, _scaled_model(TINY.step_time, (100.0,) * 6), np.random.default_rng(5), 100, 0.0)
    assert calibrator.ratios == pytest.approx((20.0,) * 6)


@pytest.mark.parametrize(
    ("features", "observed_s", "weight"),
    [
        (step_features(1, 10), 0.0, 1.0),
        (step_features(1, 10), -1.0, 1.0),
        (step_features(1, 10), math.nan, 1.0),
        (step_features(1, 10), 0.01, 0.0),
        ((0.0,) * 6, 0.01, 1.0),
        ((1.0, math.inf, 0.0, 0.0, 1.0, 1.0), 0.01, 1.0),
    ],
)
def test_observations_that_cannot_inform_the_fit_are_refused(
    features: tuple[float, ...], observed_s: float, weight: float
) -> None:
    calibrator = StepTimeCalibrator(TINY.step_time)
    assert not calibrator.observe(features, observed_s, weight)
    assert calibrator.num_samples == 0


def test_features_of_the_wrong_length_are_an_error() -> None:
    with pytest.raises(ConfigError, match="expected 6 features"):
        StepTimeCalibrator(TINY.step_time).observe((1.0, 2.0), 0.01)


def test_observe_step_takes_a_step_by_its_composition() -> None:
    a, b = StepTimeCalibrator(TINY.step_time), StepTimeCalibrator(TINY.step_time)
    for i in range(20):
        a.observe_step(num_decode_seqs=4, num_decode_context_tokens=400 + i, prefill_chunks=[(0, 64)], observed_s=0.01)
        b.observe(step_features(4, 400 + i, [(0, 64)]), 0.01)
    assert a.model.coefficients == b.model.coefficients


# -- the hop -----------------------------------------------------------------------------------------------------


def test_the_hop_is_learned_within_5_percent() -> None:
    rng = np.random.default_rng(6)
    hop = HopCalibrator()
    for _ in range(300):
        tokens = int(rng.integers(50, 2000))
        hop.observe(tokens, 0.08 + 4e-5 * tokens + rng.normal(0, 0.003))
    assert hop.fixed_s == pytest.approx(0.08, rel=0.05)
    assert hop.per_prompt_token_s == pytest.approx(4e-5, rel=0.05)
    assert hop.predict_s(1000) == pytest.approx(0.12, rel=0.02)


def test_the_hop_is_the_prior_until_min_samples_and_never_negative() -> None:
    hop = HopCalibrator(0.01, 1e-6, CalibrationConfig(min_samples=5))
    for _ in range(4):
        hop.observe(100, -0.002)  # noise around a hop of 0
        assert (hop.fixed_s, hop.per_prompt_token_s) == (0.01, 1e-6)
    for _ in range(40):
        hop.observe(100 + _, -0.001)
    assert hop.fixed_s >= 0
    assert hop.per_prompt_token_s >= 0
    assert hop.predict_s(500) < 0.005


def test_a_stalled_hop_is_rejected() -> None:
    hop = HopCalibrator()
    rng = np.random.default_rng(7)
    for _ in range(50):
        hop.observe(int(rng.integers(100, 1000)), 0.05 + rng.normal(0, 0.001))
    assert not hop.observe(500, 5.0)
    assert hop.fixed_s == pytest.approx(0.05, rel=0.05)


def test_the_hop_is_clamped_at_max_hop_s() -> None:
    hop = HopCalibrator(config=CalibrationConfig(max_hop_s=1.0, min_samples=3))
    for _ in range(20):
        hop.observe(1000, 100.0)
    assert hop.fixed_s <= 1.0 + 1e-9
    assert hop.per_prompt_token_s * 1000 <= 1.0 + 1e-9


@pytest.mark.parametrize(("fixed", "per_token"), [(-0.1, 0.0), (0.0, math.inf)])
def test_a_negative_or_infinite_hop_prior_is_refused(fixed: float, per_token: float) -> None:
    with pytest.raises(ConfigError, match="HopCalibrator"):
        HopCalibrator(fixed, per_token)


# -- one instance ------------------------------------------------------------------------------------------------


def test_a_decode_stream_prices_its_mean_batch() -> None:
    """A stream of 10 steps over batches of 2 then 6 decodes is the mean batch of 4 (the model is linear)."""
    calibration = InstanceCalibration(TINY.step_time)
    truth = _scaled_model(TINY.step_time, (2.0,) * 6)
    for i in range(30):
        context = 1000 + 50 * i
        duration = 5 * truth.decode_step_time_s(2, context // 2) + 5 * truth.decode_step_time_s(6, 3 * context // 2)
        assert calibration.observe_decode_stream(
            num_steps=10, duration_s=duration, mean_num_decode_seqs=4, mean_num_decode_context_tokens=context
        )
    assert calibration.step_time.decode_step_time_s(4, 2000) == pytest.approx(
        truth.decode_step_time_s(4, 2000), rel=0.01
    )
    assert not calibration.observe_decode_stream(
        num_steps=0, duration_s=0.1, mean_num_decode_seqs=1, mean_num_decode_context_tokens=10
    )


def test_a_chunked_prefill_is_priced_as_its_chunks() -> None:
    calibration = InstanceCalibration(TINY.step_time, max_chunk_tokens=512)
    features = calibration.prefill_features(1200)  # chunks of 512, 512, 176
    assert features[:3] == (3, 1200, 3)
    assert features[3] == pytest.approx(1200 * 1201 / 2)  # the attention pairs add up to the whole prompt's
    whole = InstanceCalibration(TINY.step_time).prefill_features(1200)
    assert whole[0] == 1
    assert whole[3] == features[3]


def test_from_profile_folds_the_serving_overheads_into_the_prior() -> None:
    serving = ServingOverheads(
        per_step_s=0.002, per_streamed_token_s=0.0005, per_request_s=0.004, pd_hop_fixed_s=0.1, source="test"
    )
    profile = Profile(TINY.file.model_copy(update={"serving": serving}))
    calibration = InstanceCalibration.from_profile(profile)
    prior = calibration.step.base.coefficients
    engine = TINY.step_time.coefficients
    assert prior.const_s == pytest.approx(engine.const_s + 0.002)
    assert prior.per_decode_seq_s == pytest.approx(engine.per_decode_seq_s + 0.0005)
    assert prior.per_prefill_seq_s == pytest.approx(engine.per_prefill_seq_s + 0.004)
    assert calibration.pd_hop_fixed_s == 0.1
    assert served_step_time(TINY.step_time, ServingOverheads(source="none")) is TINY.step_time


def test_the_calibrated_profile_file_loads_as_a_profile(tmp_path: Path) -> None:
    calibration = InstanceCalibration(BASE.step_time)
    rng = np.random.default_rng(8)
    truth = _scaled_model(BASE.step_time, (2.0,) * 6)
    for features in _steps(rng, 100):
        calibration.step.observe(features, _predict(truth, features))
    for _ in range(20):
        calibration.observe_pd_hop(num_prompt_tokens=int(rng.integers(100, 1000)), hop_s=0.05)
    file = calibration.profile_file(BASE.file, "test, instance http://x:1")
    path = tmp_path / "calibrated.json"
    write_profile_file(file, path)
    loaded = load_profile(path)
    assert loaded.name == f"{BASE.name}-online"
    assert loaded.step_time.coefficients == calibration.step_time.coefficients
    assert loaded.serving.pd_hop_s(500) == pytest.approx(0.05, rel=0.01)
    assert loaded.serving.per_step_s == 0.0
    assert "online calibration" in loaded.file.fit.method
    assert "100 step observations" in loaded.file.fit.method
    assert loaded.file.fit.num_samples_fitted == 100
    assert loaded.file.fit.median_relative_error < 0.01
    assert loaded.file.metadata.environment["calibration"].startswith("test, instance http://x:1")
    assert loaded.file.samples == BASE.file.samples  # the offline measurement, the prior, is kept


# -- the profile schema's serving section -----------------------------------------------------------------------


def test_a_profile_without_serving_loads_with_zero_overheads_and_is_written_as_before(tmp_path: Path) -> None:
    assert BASE.file.serving is None
    assert BASE.serving.per_request_s == 0
    assert BASE.serving.pd_hop_s(1000) == 0
    path = tmp_path / "same.json"
    write_profile_file(BASE.file, path)
    assert "serving" not in json.loads(path.read_text())
    assert ProfileFile.model_validate(json.loads(path.read_text())) == BASE.file


def test_a_serving_section_round_trips_and_scales_with_the_profile(tmp_path: Path) -> None:
    serving = ServingOverheads(
        per_step_s=0.001,
        per_streamed_token_s=0.0002,
        per_request_s=0.005,
        pd_hop_fixed_s=0.2,
        pd_hop_per_prompt_token_s=1e-5,
        source="measured",
    )
    file = BASE.file.model_copy(update={"serving": serving})
    path = tmp_path / "served.json"
    write_profile_file(file, path)
    assert load_profile(path).serving == serving
    assert time_scaled(file, 2.0).serving == serving.model_copy(
        update={
            "per_step_s": 0.002,
            "per_streamed_token_s": 0.0004,
            "per_request_s": 0.01,
            "pd_hop_fixed_s": 0.4,
            "pd_hop_per_prompt_token_s": 2e-5,
        }
    )
    assert serving.pd_hop_s(1000) == pytest.approx(0.21)


def test_a_negative_serving_overhead_names_the_field(tmp_path: Path) -> None:
    data = BASE.file.model_dump(mode="json")
    data["serving"] = {"per_step_s": -1.0, "source": "oops"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ProfileFormatError, match=r"bad.json:\d+: field serving.per_step_s"):
        load_profile(path)


def test_calibrated_profile_file_without_observations_reports_the_errors_on_the_offline_samples() -> None:
    file = calibrated_profile_file(BASE.file, BASE.step_time, None, "nothing learned yet")
    assert file.fit.coefficients == BASE.file.fit.coefficients
    assert file.fit.median_relative_error == pytest.approx(BASE.file.fit.median_relative_error, abs=1e-6)
    assert file.serving is None
    assert file.metadata.name == f"{BASE.name}-online"
    again = calibrated_profile_file(file, BASE.step_time, None, "again")
    assert again.metadata.name == f"{BASE.name}-online"  # not -online-online
