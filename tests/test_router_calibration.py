"""Online calibration in the router, checked from outside: fake engines that run off the router's profile, or add
a P/D hop, are learned within 10% (read back through ``GET /v1/tropical/profile?instance=URL``); engines that run
exactly at the profile leave it where it is."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tropical_sched.core import WorkerRole
from tropical_sched.predictors import Profile, load_profile, time_scaled, write_profile_file
from tropical_sched.predictors.profile import ProfileFile
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.fake_engine import FakeEngine
from tropical_sched.serve.router import Router
from tropical_sched.serve.testing import ServerThread

BASE = load_profile("a100-llama2-70b-tp4")
# The engines run the A100 profile at 0.3x its times: decode steps of 13-15 ms and prefills of 20-70 ms, well above
# the few tenths of a millisecond that HTTP adds per token on this machine, so that what is learned is the engine.
ENGINE_SCALE = 0.3
HOP_FIXED_S = 0.08  # the multiplexing engine's P/D hop: 80 ms + 0.1 ms per prompt token (a KV transfer's delay)
HOP_PER_TOKEN_S = 1e-4
NO_SLO = {"x-slo-ttft-ms": "600000", "x-slo-tpot-ms": "600000"}  # the test is about predictions, not admission


class _Deployment:
    """A prefill and a multiplexing fake engine behind a Tropical router (prefill-first: every request takes the
    P/D path, so the prefill engine is seen prefilling and the multiplexing one decoding)."""

    def __init__(self, router_profile: Path, engine: Profile, *, hop: bool, **options: object) -> None:
        self.prefill = FakeEngine(engine, engine_id="p", policy="tropical", role=WorkerRole.PREFILL)
        self.mux = FakeEngine(
            engine,
            engine_id="m",
            policy="tropical",
            role=WorkerRole.MULTIPLEXING,
            pd_hop_fixed_s=HOP_FIXED_S if hop else 0.0,
            pd_hop_per_prompt_token_s=HOP_PER_TOKEN_S if hop else 0.0,
        )
        self.servers = [ServerThread(self.prefill.app).start(), ServerThread(self.mux.app).start()]
        config = {
            "profile": str(router_profile),
            "policy_options": {"route_order": "prefill-first"},
            "instances": [
                {"url": self.servers[0].url, "role": "prefill"},
                {"url": self.servers[1].url, "role": "multiplexing"},
            ],
            **options,
        }
        self.router = Router(RouterConfig.model_validate(config))
        self.server = ServerThread(self.router.app).start()
        self.url = self.server.url

    def close(self) -> None:
        for server in (self.server, *self.servers):
            server.stop()

    def send(self, num_requests: int, rate_per_s: float, seed: int = 0) -> None:
        """Poisson arrivals of completions with 100-800 prompt tokens and 4-16 output tokens; all must succeed."""

        async def run() -> None:
            rng = random.Random(seed)
            async with httpx.AsyncClient(timeout=60) as client:

                async def one(prompt: list[int], max_tokens: int) -> None:
                    body = {"prompt": prompt, "max_tokens": max_tokens}
                    response = await client.post(self.url + "/v1/completions", json=body, headers=NO_SLO)
                    assert response.status_code == 200, response.text

                tasks = []
                for _ in range(num_requests):
                    prompt = [rng.randrange(10, 1000) for _ in range(rng.randint(100, 800))]
                    tasks.append(asyncio.create_task(one(prompt, rng.randint(4, 16))))
                    await asyncio.sleep(rng.expovariate(rate_per_s))
                await asyncio.gather(*tasks)

        asyncio.run(run())

    def calibrated(self, index: int, tmp_path: Path) -> Profile:
        """The instance's calibrated profile as ``tropical-profile save`` would keep it: fetched, written, loaded."""
        url = self.servers[index].url
        response = httpx.get(self.url + "/v1/tropical/profile", params={"instance": url}, timeout=10)
        assert response.status_code == 200, response.text
        path = tmp_path / f"instance-{index}.json"
        write_profile_file(ProfileFile.model_validate(response.json()), path)
        return load_profile(path)


def _router_profile(tmp_path: Path, scale: float) -> Path:
    path = tmp_path / "router-profile.json"
    write_profile_file(time_scaled(BASE.file, scale), path)
    return path


@pytest.fixture
def slow_engines(tmp_path: Path) -> Iterator[_Deployment]:
    """Engines 10x slower than the router's profile says, the decoding one with a P/D hop."""
    deployment = _Deployment(
        _router_profile(tmp_path, ENGINE_SCALE / 10), Profile(time_scaled(BASE.file, ENGINE_SCALE)), hop=True
    )
    yield deployment
    deployment.close()


@pytest.mark.slow
def test_engines_10x_off_the_profile_and_the_pd_hop_are_learned_within_10_percent_in_200_requests(
    slow_engines: _Deployment, tmp_path: Path
) -> None:
    """The issue's number: learned step times within 10% after at most 300 requests on fake engines that run 10x
    off the profile, and the hop cost within 10%, checked from outside through GET /v1/tropical/profile."""
    slow_engines.send(200, rate_per_s=14.0)
    truth = time_scaled(BASE.file, ENGINE_SCALE)
    engine = Profile(truth).step_time
    prefill, mux = slow_engines.calibrated(0, tmp_path), slow_engines.calibrated(1, tmp_path)
    assert prefill.name == mux.name == f"{BASE.name}-x{ENGINE_SCALE / 10:g}-online"
    prefill_added_s, mux_added_s = _engine_added_s(slow_engines, engine)
    for tokens in (128, 256, 512, 800):  # the prefill engine's prefills
        truth_s = engine.prefill_time_s(tokens)
        _assert_within(prefill.step_time.prefill_time_s(tokens), truth_s, truth_s + prefill_added_s, rel=0.10)
    for decodes in (1, 2, 4, 8):  # the multiplexing engine's decode steps
        for context in (300, 800):
            truth_s = engine.decode_step_time_s(decodes, decodes * context)
            calibrated_s = mux.step_time.decode_step_time_s(decodes, decodes * context)
            _assert_within(calibrated_s, truth_s, truth_s + mux_added_s, rel=0.10)
    for tokens in (128, 512, 800):  # the hop of requests prefilled on the prefill engine
        assert prefill.serving.pd_hop_s(tokens) == pytest.approx(HOP_FIXED_S + HOP_PER_TOKEN_S * tokens, rel=0.10)
    assert "learned online" in (prefill.file.serving.source if prefill.file.serving else "")
    assert prefill.file.fit.num_samples_fitted >= 20
    assert "online calibration" in prefill.file.fit.method

    # The snapshot the policy reads carries the calibrated model and the hop.
    snapshot = slow_engines.router.snapshot()
    assert snapshot.workers[1].step_time is not None
    assert snapshot.workers[1].step_time.coefficients == mux.step_time.coefficients
    assert snapshot.workers[0].pd_hop_fixed_s == pytest.approx(prefill.serving.pd_hop_fixed_s)

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(slow_engines.url + "/metrics").text)
        for s in family.samples
    }
    mux_url = slow_engines.servers[1].url
    const = samples[("tropical_router_calibrated_step_time_coefficient", (("instance", mux_url), ("term", "const_s")))]
    assert const == pytest.approx(mux.step_time.coefficients.const_s)
    ratio = samples[("tropical_router_calibrated_step_time_ratio", (("instance", mux_url), ("term", "const_s")))]
    assert ratio == pytest.approx(10, rel=0.1)
    hop_url = slow_engines.servers[0].url
    assert samples[("tropical_router_calibrated_pd_hop", (("instance", hop_url), ("term", "fixed")))] == pytest.approx(
        prefill.serving.pd_hop_fixed_s
    )
    assert samples[("tropical_router_ttft_relative_prediction_error_count", ())] == 200
    assert samples[("tropical_router_tpot_relative_prediction_error_count", ())] == 200


@pytest.mark.slow
def test_with_engines_at_the_profile_the_calibrated_predictions_stay_at_the_profile(tmp_path: Path) -> None:
    """Never worse than the offline profile when the profile is right, and never off what the engines ran.

    The fake engines sleep the profile's step time, but a step also takes what their event loop adds, and a prefill
    that ran alone is timed from the router less the bare HTTP round trip, so it keeps what the engine's server adds
    to a request: on an idle machine a fraction of a millisecond, on a busy 2-core CI machine a millisecond or more
    that varies with the load (0.95 ms on a 13 ms decode step once, 7%). So the calibrated model must lie between the
    profile and the profile plus what the instance's engine was seen to add (the 90th percentile of observed less
    profile over its recent steps): decode steps within 3% or 0.5 ms of that band, prefills within 6% or 2 ms; what
    the engines add is never negative (a fake engine cannot run faster than it sleeps); and on what was observed, the
    calibrated model errs no more than the profile."""
    profile_path = _router_profile(tmp_path, ENGINE_SCALE)
    deployment = _Deployment(profile_path, Profile(time_scaled(BASE.file, ENGINE_SCALE)), hop=False)
    try:
        deployment.send(100, rate_per_s=14.0, seed=1)
        engine = Profile(time_scaled(BASE.file, ENGINE_SCALE)).step_time
        prefill, mux = deployment.calibrated(0, tmp_path), deployment.calibrated(1, tmp_path)
        prefill_added_s, mux_added_s = _engine_added_s(deployment, engine)
        for instance in deployment.router.instances:
            calibration = instance.calibration
            assert calibration is not None
            seen = calibration.step.recent_observations()

            def error(model: object, seen: list[tuple[tuple[float, ...], float]] = seen) -> float:
                return sum(abs(_predicted_s(model, f) / t - 1) for f, t in seen)

            # The fit minimizes squared relative error under its prior and forgetting; this sums absolute relative
            # errors: on the same samples the two criteria can trade a few percent, so "no worse" allows 10%.
            assert error(calibration.step_time) <= 1.10 * error(engine)
        for decodes in (1, 2, 4, 8):
            for context in (300, 800):
                profile_s = engine.decode_step_time_s(decodes, decodes * context)
                calibrated_s = mux.step_time.decode_step_time_s(decodes, decodes * context)
                _assert_within(calibrated_s, profile_s, profile_s + mux_added_s, rel=0.03, abs_s=5e-4)
        for tokens in (128, 256, 512, 800):
            profile_s = engine.prefill_time_s(tokens)
            calibrated_s = prefill.step_time.prefill_time_s(tokens)
            _assert_within(calibrated_s, profile_s, profile_s + prefill_added_s, rel=0.06, abs_s=2e-3)
    finally:
        deployment.close()


def _predicted_s(model: object, features: tuple[float, ...]) -> float:
    """A step-time model's prediction for one observation's features (the calibrated fit's linear form)."""
    coefficients = model.coefficients.as_tuple()  # type: ignore[attr-defined]
    return float(sum(c * x for c, x in zip(coefficients, features, strict=True)))


def _engine_added_s(deployment: _Deployment, engine: object) -> tuple[float, float]:
    """What the prefill and the multiplexing fake engine were seen to add to ``engine``'s step times, in seconds:
    the 90th percentile of observed less predicted over each instance's recent steps (at least 20), at least 0. The
    fake engines sleep ``engine``'s times; their event loop and HTTP server add to that, a fraction of a millisecond
    on an idle machine, a millisecond or more on a busy one. A median below -0.5 ms fails: a fake engine cannot run
    faster than it sleeps."""
    added_s = []
    for instance in deployment.router.instances:
        assert instance.calibration is not None
        seen = instance.calibration.step.recent_observations()
        assert len(seen) >= 20
        excess_s = [t - _predicted_s(engine, f) for f, t in seen]
        assert statistics.median(excess_s) >= -5e-4, excess_s
        added_s.append(max(0.0, statistics.quantiles(excess_s, n=10)[-1]))
    return added_s[0], added_s[1]


def _assert_within(value_s: float, low_s: float, high_s: float, *, rel: float, abs_s: float = 0.0) -> None:
    """``value_s`` in ``[low_s, high_s]`` widened by ``rel`` or ``abs_s``, whichever is wider."""
    assert low_s - max(rel * low_s, abs_s) <= value_s <= high_s + max(rel * high_s, abs_s), (value_s, low_s, high_s)


def test_calibration_off_serves_the_offline_profile_and_snapshots_carry_no_model(tmp_path: Path) -> None:
    profile_path = _router_profile(tmp_path, 0.05)
    engines = Profile(time_scaled(BASE.file, 0.05))
    deployment = _Deployment(profile_path, engines, hop=False, calibration={"enabled": False})
    try:
        deployment.send(5, rate_per_s=50.0)
        url = deployment.servers[1].url
        body = httpx.get(deployment.url + "/v1/tropical/profile", params={"instance": url}).json()
        assert ProfileFile.model_validate(body) == engines.file
        assert all(w.step_time is None for w in deployment.router.snapshot().workers)
        assert not any(w.sees_step_in_flight for w in deployment.router.snapshot().workers)  # it sees no steps
        assert "tropical_router_calibrated_step_time_coefficient{" not in httpx.get(deployment.url + "/metrics").text
    finally:
        deployment.close()


def test_the_profile_endpoint_serves_the_offline_profile_on_request_and_refuses_a_bad_flag(tmp_path: Path) -> None:
    profile_path = _router_profile(tmp_path, 0.05)
    engines = Profile(time_scaled(BASE.file, 0.05))
    deployment = _Deployment(profile_path, engines, hop=False)
    try:
        url = deployment.servers[0].url
        offline = httpx.get(deployment.url + "/v1/tropical/profile", params={"instance": url, "calibrated": "false"})
        assert ProfileFile.model_validate(offline.json()) == engines.file
        online = httpx.get(deployment.url + "/v1/tropical/profile", params={"instance": url})
        assert online.json()["metadata"]["name"].endswith("-online")  # the prior until observations come in
        assert online.json()["fit"]["coefficients"] == engines.file.fit.coefficients
        own = httpx.get(deployment.url + "/v1/tropical/profile")  # the router's own: offline (SLOs come from it)
        assert ProfileFile.model_validate(own.json()) == engines.file
        bad = httpx.get(deployment.url + "/v1/tropical/profile", params={"instance": url, "calibrated": "maybe"})
        assert bad.status_code == 400
        assert "query calibrated = 'maybe'" in bad.json()["error"]["message"]
    finally:
        deployment.close()


def test_the_router_config_takes_the_calibration_settings() -> None:
    config = RouterConfig.model_validate(
        {
            "instances": [{"url": "http://a:1", "role": "prefill", "max_num_batched_tokens": 512}],
            "calibration": {"half_life_samples": 100, "max_ratio": 5},
        }
    )
    assert config.calibration.enabled
    assert config.calibration.config().half_life_samples == 100
    assert config.calibration.config().max_ratio == 5
    with pytest.raises(ValueError, match="min_ratio"):
        RouterConfig.model_validate(
            {"instances": [{"url": "http://a:1", "role": "prefill"}], "calibration": {"min_ratio": 2}}
        )
    with pytest.raises(ValueError, match=r"calibration\.nonsense"):
        RouterConfig.model_validate(
            {"instances": [{"url": "http://a:1", "role": "prefill"}], "calibration": {"nonsense": 1}}
        )


def test_a_remote_prefill_on_a_fake_engine_with_a_hop_starts_decoding_after_it() -> None:
    engine = FakeEngine(Profile(time_scaled(BASE.file, 0.01)), pd_hop_fixed_s=0.2, pd_hop_per_prompt_token_s=1e-4)
    body = {
        "prompt": list(range(10, 1010)),
        "max_tokens": 2,
        "kv_transfer_params": {"do_remote_prefill": True},
    }
    with ServerThread(engine.app) as server:
        started = asyncio.run(_time_first_event(server.url, body))
        plain = asyncio.run(_time_first_event(server.url, {**body, "kv_transfer_params": {}}))
    assert 0.3 <= started < 0.45  # 0.2 s + 1,000 tokens x 0.1 ms, then one decode step of ~0.5 ms
    assert plain < 0.1
    with pytest.raises(ValueError, match="pd_hop_fixed_s"):
        FakeEngine(BASE, pd_hop_fixed_s=-1)


async def _time_first_event(url: str, body: dict[str, object]) -> float:
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=10) as client:
        started = loop.time()
        async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return loop.time() - started
    raise AssertionError("no token")


def test_an_aborted_request_during_the_hop_frees_its_reserved_kv() -> None:
    engine = FakeEngine(Profile(time_scaled(BASE.file, 0.01)), pd_hop_fixed_s=0.3)
    body = {"prompt": list(range(10, 510)), "max_tokens": 50, "kv_transfer_params": {"do_remote_prefill": True}}

    async def leave_early(url: str) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url + "/v1/completions", json={**body, "stream": True}, timeout=0.1)
        await asyncio.sleep(0.5)

    with ServerThread(engine.app) as server:
        asyncio.run(leave_early(server.url))
        assert engine._worker.kv_used == 0
        assert not engine._worker.decodes


def test_the_fake_engine_command_takes_a_pd_hop_in_milliseconds() -> None:
    from tropical_sched.cli.main import build_parser

    args = build_parser().parse_args(["fake-engine", "--pd-hop-ms", "80", "--pd-hop-per-token-ms", "0.1"])
    assert (args.pd_hop_ms, args.pd_hop_per_token_ms) == (80.0, 0.1)
    assert build_parser().parse_args(["fake-engine"]).pd_hop_ms == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fake-engine", "--pd-hop-ms", "-1"])
