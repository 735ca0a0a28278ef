"""The step-time model: features, derived quantities, chunk sizing and range warnings."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import make_model
from tropical_sched.core import ConfigError
from tropical_sched.predictors import (
    ProfileRangeWarning,
    StepTimeCoefficients,
    ValidRange,
    load_profile,
    step_features,
)

A100 = load_profile("a100-llama2-70b-tp4").step_time
A100_ANY_RANGE = make_model(A100.coefficients)  # the same coefficients, without range warnings


def test_features_of_a_mixed_step() -> None:
    # 3 decodes with 300 context tokens, plus a 4-token chunk after a 10-token prefix.
    assert step_features(3, 300, [(10, 4)]) == (1.0, 7.0, 1.0, 4 * 10 + 4 * 5 / 2, 3.0, 300.0)


def test_step_time_is_the_dot_product_of_features_and_coefficients() -> None:
    model = make_model(
        StepTimeCoefficients(
            const_s=1,
            per_batched_token_s=2,
            per_prefill_seq_s=3,
            per_prefill_attention_pair_s=4,
            per_decode_seq_s=5,
            per_decode_context_token_s=6,
        )
    )
    # features (1, 7, 1, 50, 3, 300)
    assert model.step_time_s(num_decode_seqs=3, num_decode_context_tokens=300, prefill_chunks=[(10, 4)]) == (
        1 + 14 + 3 + 200 + 15 + 1800
    )
    assert model.step_time_s() == 0.0


def test_isolated_prefill_is_the_quadratic_of_the_design_doc() -> None:
    a2, a1, a0 = A100.prefill_quadratic_coefficients()
    for length in (1, 128, 1000, 4096):
        assert A100.prefill_time_s(length) == pytest.approx(a2 * length**2 + a1 * length + a0)


def test_remaining_prefill_in_chunks_costs_a_step_overhead_per_chunk() -> None:
    model = make_model()  # linear: 10 ms + 0.1 ms/token per step
    assert model.remaining_prefill_time_s(1000) == pytest.approx(0.010 + 0.1)
    assert model.remaining_prefill_time_s(1000, 400) == pytest.approx(0.010 + 0.06)
    assert model.remaining_prefill_time_s(1000, 0, chunk_tokens=300) == pytest.approx(4 * 0.010 + 0.1)
    assert model.remaining_prefill_time_s(1000, 1000) == 0.0


def test_decode_step_matches_the_general_step_time() -> None:
    assert A100.decode_step_time_s(32, 32_000) == pytest.approx(
        A100.step_time_s(num_decode_seqs=32, num_decode_context_tokens=32_000)
    )


def test_bundled_a100_profile_is_plausible() -> None:
    # Splitwise measured ~127 ms for a 512-token prompt and ~44 ms for one decode step on 4 x A100.
    assert A100.prefill_time_s(512) == pytest.approx(0.127, rel=0.05)
    assert A100.decode_step_time_s(1, 600) == pytest.approx(0.044, rel=0.05)


@given(
    decodes=st.integers(0, 64),
    context=st.integers(0, 2000),
    prefix=st.integers(0, 4000),
    chunk=st.integers(1, 4000),
    extra=st.integers(1, 500),
)
def test_step_time_is_monotone_in_every_input(decodes: int, context: int, prefix: int, chunk: int, extra: int) -> None:
    def t(d: int = decodes, c: int = context * decodes, p: int = prefix, k: int = chunk) -> float:
        return A100_ANY_RANGE.step_time_s(num_decode_seqs=d, num_decode_context_tokens=c, prefill_chunks=[(p, k)])

    base = t()
    assert t(d=decodes + 1, c=context * decodes + 1) >= base
    assert t(c=context * decodes + extra) >= base
    assert t(p=prefix + extra) >= base
    assert t(k=chunk + extra) >= base


@given(
    budget=st.floats(0.0, 2.0), decodes=st.integers(0, 64), context=st.integers(1, 3000), prefix=st.integers(0, 4000)
)
def test_max_chunk_is_the_largest_that_fits_the_budget(budget: float, decodes: int, context: int, prefix: int) -> None:
    total_context = decodes * context

    def step(chunk: int) -> float:
        return A100_ANY_RANGE.step_time_s(
            num_decode_seqs=decodes, num_decode_context_tokens=total_context, prefill_chunks=[(prefix, chunk)]
        )

    chunk = A100_ANY_RANGE.max_chunk_tokens_within(
        budget, num_decode_seqs=decodes, num_decode_context_tokens=total_context, num_prefix_tokens=prefix
    )
    assert chunk >= 0
    if chunk > 0:
        assert step(chunk) <= budget + 1e-12
    assert step(chunk + 1) > budget - 1e-12


def test_max_chunk_of_a_profile_whose_prefill_tokens_cost_nothing_is_unbounded_not_a_hang() -> None:
    """A noisy fit (seen on an endpoint profile of a tiny CPU model) can give prefill tokens no cost at all; the
    chunk search once looped forever on it."""
    free_tokens = make_model(
        StepTimeCoefficients(
            const_s=0.014,
            per_batched_token_s=0.0,
            per_prefill_seq_s=0.038,
            per_prefill_attention_pair_s=0.0,
            per_decode_seq_s=0.0028,
            per_decode_context_token_s=2.6e-6,
        )
    )
    kwargs = {"num_decode_seqs": 2, "num_decode_context_tokens": 800, "num_prefix_tokens": 100}
    assert free_tokens.max_chunk_tokens_within(1.0, **kwargs) == 2**31 - 1
    assert free_tokens.max_chunk_tokens_within(0.01, **kwargs) == 0  # the fixed step costs exceed the budget


def test_out_of_range_prediction_warns_once_and_says_by_how_much() -> None:
    model = make_model(
        valid_range=ValidRange(
            max_num_prompt_tokens=1000,
            max_num_batched_tokens=1000,
            max_num_decode_seqs=8,
            max_decode_context_tokens_per_seq=100,
        )
    )
    with pytest.warns(
        ProfileRangeWarning,
        match=r"prompt length \(tokens\) 1,500 is beyond the profiled maximum "
        r"1,000 \(by 500, 1.50x\)",
    ):
        model.prefill_time_s(1500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.prefill_time_s(3000)  # the same dimension warns only once
        model.prefill_time_s(500)
    with pytest.warns(ProfileRangeWarning, match="decode batch size"):
        model.decode_step_time_s(9, 90)


def test_negative_coefficients_and_counts_are_rejected() -> None:
    with pytest.raises(ConfigError, match="per_batched_token_s must be finite and >= 0"):
        StepTimeCoefficients(
            const_s=0,
            per_batched_token_s=-1,
            per_prefill_seq_s=0,
            per_prefill_attention_pair_s=0,
            per_decode_seq_s=0,
            per_decode_context_token_s=0,
        )
    with pytest.raises(ConfigError, match="num_decode_seqs=-1"):
        make_model().step_time_s(num_decode_seqs=-1)
    with pytest.raises(ConfigError, match="num_prompt_tokens must be >= 1"):
        make_model().prefill_time_s(0)


@given(
    factor=st.floats(0.01, 100), decodes=st.integers(0, 64), context=st.integers(0, 10_000), chunk=st.integers(1, 4096)
)
def test_a_scaled_model_predicts_every_step_that_many_times_as_long(
    factor: float, decodes: int, context: int, chunk: int
) -> None:
    scaled = A100_ANY_RANGE.scaled(factor)
    step = {"num_decode_seqs": decodes, "num_decode_context_tokens": context, "prefill_chunks": [(100, chunk)]}
    assert scaled.step_time_s(**step) == pytest.approx(factor * A100_ANY_RANGE.step_time_s(**step), rel=1e-12)
    assert scaled.valid_range == A100_ANY_RANGE.valid_range
    assert A100_ANY_RANGE.scaled(10.0).name == "test x10"
    with pytest.raises(ConfigError, match="factor must be > 0"):
        A100_ANY_RANGE.scaled(0.0)
