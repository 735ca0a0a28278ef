"""Engine-side online calibration: the scheduler class refits its engine's step-time model from the steps it runs
and caps with it (runs without an engine: the steps are those a vLLM or SGLang scheduler would report)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from tests.test_vllm_logic import side, vllm_request
from tropical_sched.adapters.engine_side import classify_step


def test_classify_step_splits_prefill_chunks_from_decodes() -> None:
    scheduled = {"p": 512, "d1": 1, "d2": 1, "idle": 0}
    before = {"p": 1024, "d1": 300, "d2": 99, "idle": 5}
    prompts = {"p": 2048, "d1": 200, "d2": 50, "idle": 10}
    assert classify_step(scheduled, before, prompts) == (2, 301 + 100, ((1024, 512),))
    with pytest.raises(KeyError):
        classify_step({"x": 1}, {}, {})


def _run_steps(engine, true_model, rng: random.Random, num_steps: int) -> None:  # type: ignore[no-untyped-def]
    """Feed ``engine`` steps of random composition, each taking what ``true_model`` says (with 3% noise)."""
    for _ in range(num_steps):
        num_decodes = rng.randrange(0, 24)
        context = sum(rng.randrange(50, 1500) for _ in range(num_decodes))
        chunks = ((rng.randrange(0, 1024), rng.randrange(16, 512)),) if rng.random() < 0.4 else ()
        if not num_decodes and not chunks:
            continue
        duration_s = true_model.step_time_s(
            num_decode_seqs=num_decodes, num_decode_context_tokens=context, prefill_chunks=chunks
        ) * rng.uniform(0.97, 1.03)
        engine.observe_step(
            num_decode_seqs=num_decodes, num_decode_context_tokens=context, prefill_chunks=chunks, duration_s=duration_s
        )


@pytest.mark.parametrize("scale", [0.2, 3.0])
def test_the_engine_side_learns_its_engines_step_times_and_caps_with_them(scale: float) -> None:
    engine, clock = side("multiplexing", profile="a100-llama2-70b-tp4")
    profile_model = engine.profile.step_time
    true_model = profile_model.scaled(scale)
    running = [vllm_request(f"d{i}", 500, computed=500, outputs=20, tropical_tpot_slo_ms=200) for i in range(8)]
    waiting = vllm_request("w", 3000)
    clock.now = 101.0
    engine.observe_outputs(running)  # first tokens at 101 s
    clock.now = 101.0 + 19 * 0.2 - 0.05  # 50 ms of slack left on every decode
    cap_before = engine.prefill_token_cap(running, waiting)
    _run_steps(engine, true_model, random.Random(0), 400)
    assert engine.num_steps_observed >= 350
    learned = engine.step_time
    for decodes, context, chunks in [(1, 500, ()), (16, 16 * 800, ()), (4, 2000, ((0, 256),)), (0, 0, ((512, 512),))]:
        truth = true_model.step_time_s(
            num_decode_seqs=decodes, num_decode_context_tokens=context, prefill_chunks=chunks
        )
        predicted = learned.step_time_s(
            num_decode_seqs=decodes, num_decode_context_tokens=context, prefill_chunks=chunks
        )
        assert predicted == pytest.approx(truth, rel=0.10)
    cap_after = engine.prefill_token_cap(running, waiting)
    assert cap_before is not None
    assert cap_after is not None
    # A faster engine fits more prefill tokens into the same slack, a slower one fewer.
    assert (cap_after[1] > cap_before[1]) if scale < 1 else (cap_after[1] < cap_before[1])


def test_an_engine_that_runs_at_its_profile_keeps_the_profile() -> None:
    engine, _ = side("multiplexing", profile="a100-llama2-70b-tp4")
    profile_model = engine.profile.step_time
    _run_steps(engine, profile_model, random.Random(1), 300)
    learned = engine.step_time
    for decodes, context, chunks in [(1, 500, ()), (32, 32 * 1000, ()), (8, 4000, ((256, 512),))]:
        kwargs = {"num_decode_seqs": decodes, "num_decode_context_tokens": context, "prefill_chunks": chunks}
        assert learned.step_time_s(**kwargs) == pytest.approx(profile_model.step_time_s(**kwargs), rel=0.03)


def test_calibration_can_be_switched_off() -> None:
    engine, _ = side("multiplexing", online_calibration=False)
    model = engine.step_time
    _run_steps(engine, model.scaled(5.0), random.Random(2), 100)
    assert engine.step_time is model
    assert engine.calibrator is None


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name

    def is_decode(self) -> bool:
        return self.name == "decode"

    def is_extend(self) -> bool:
        return self.name in ("extend", "mixed")


def _req(prompt: int, outputs: int = 0) -> SimpleNamespace:
    return SimpleNamespace(origin_input_ids=[1] * prompt, output_ids=[2] * outputs)


def test_sglang_batches_are_read_as_step_compositions() -> None:
    from tropical_sched.adapters.sglang.logic import batch_composition

    a, b, c = _req(100, 5), _req(200, 9), _req(3000)
    decode = SimpleNamespace(forward_mode=_Mode("decode"), reqs=[a, b], seq_lens_sum=105 + 209)
    assert batch_composition(decode) == (2, 314, ())
    extend = SimpleNamespace(forward_mode=_Mode("extend"), reqs=[c], prefix_lens=[1024], extend_lens=[512])
    assert batch_composition(extend) == (0, 0, ((1024, 512),))
    mixed = SimpleNamespace(
        forward_mode=_Mode("mixed"),
        reqs=[c, a, b],
        prefix_lens=[1536, 104, 208],
        extend_lens=[256, 1, 1],
        decoding_reqs=[a, b],
    )
    assert batch_composition(mixed) == (2, 105 + 209, ((1536, 256),))
    assert batch_composition(SimpleNamespace(forward_mode=_Mode("idle"), reqs=[a])) is None
    assert batch_composition(SimpleNamespace(forward_mode=_Mode("decode"), reqs=[])) is None
