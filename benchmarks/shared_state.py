"""Two routers in front of the same engines against one: does reading the engines' live state keep them consistent?

One prefill and two multiplexing fake engines (``tropical fake-engine``, the A100 Llama-2-70B TP4 profile at
real speed, the Tropical engine-side scheduler) serve the same replay of a bundled trace three ways, each on fresh
engines and routers (``tropical serve``, policy tropical, every component its own process on 127.0.0.1):

* **one router**: the replay sends everything to it;
* **two routers, own counts**: the replay alternates between two routers (``tropical replay --url A --url B``),
  each deciding from what it sent itself (``live_state_interval_s: 0``);
* **two routers, live state**: the same, each reading every engine's ``GET /v1/tropical/state`` every
  ``--interval-ms`` (:mod:`tropical_sched.live_state`) and deciding from it.

It prints joint SLO attainment (TTFT and TPOT both met) and its parts per way and seed, and writes them as JSON
with ``--json``. On the 2 cores of the development machine the replay client, the routers and the three engines
share the cores.

Usage: python benchmarks/shared_state.py [--rate 7] [--num-requests 300] [--seeds 0 1] [--interval-ms 50]
    [--json benchmarks/results/shared-state.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from router_burst import _engine

from tropical_sched.serve.testing import ServerProcess, free_port

TROPICAL = [sys.executable, "-m", "tropical_sched.cli.main"]
PROFILE = "a100-llama2-70b-tp4"
TRACE = "azure-conv-2023"
ROLES = ("prefill", "multiplexing", "multiplexing")


def _engines(log_dir: Path) -> tuple[list[ServerProcess], list[str]]:
    ports = [free_port() for _ in ROLES]
    processes = [_engine(port, role, PROFILE, log_dir) for port, role in zip(ports, ROLES, strict=True)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for process, url in zip(processes, urls, strict=True):
        process.wait_healthy(url, timeout_s=60)
    return processes, urls


def _routers(
    count: int, engine_urls: list[str], interval_s: float, log_dir: Path, decision_log: Path | None = None
) -> tuple[list[ServerProcess], list[str]]:
    """``count`` routers over the engines (each with its own decision log ``<decision_log>.<index>``, if given)."""
    config = log_dir / f"router-{time.monotonic_ns()}.json"
    config.write_text(
        json.dumps(
            {
                "policy": "tropical",
                "profile": PROFILE,
                "model": "fake-model",
                "live_state_interval_s": interval_s,
                "instances": [{"url": url, "role": role} for url, role in zip(engine_urls, ROLES, strict=True)],
            }
        )
    )
    processes, urls = [], []
    for index in range(count):
        port = free_port()
        command = [*TROPICAL, "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
        if decision_log is not None:
            command += ["--decision-log", f"{decision_log}.{index}"]
        processes.append(ServerProcess(command, log_dir / f"router-{index}-{time.monotonic_ns()}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    for process, url in zip(processes, urls, strict=True):
        process.wait_healthy(url, timeout_s=60)
    return processes, urls


def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks, from Linux's ``/proc/stat``."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _replay(urls: list[str], args: argparse.Namespace, seed: int, label: str, log_dir: Path) -> dict[str, Any]:
    out = log_dir / f"replay-{label.replace(' ', '-').replace(',', '')}-{seed}.json"
    command = [
        *TROPICAL,
        "replay",
        *(part for url in urls for part in ("--url", url)),
        "--trace",
        TRACE,
        "--rate",
        f"{args.rate:g}",
        "--num-requests",
        str(args.num_requests),
        "--seed",
        str(seed),
        "--label",
        label,
        "--json",
        str(out),
        "--no-progress",
    ]
    busy_before, total_before = _cpu_times()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    busy_after, total_after = _cpu_times()
    figures = json.loads(out.read_text())["policies"][label]
    keys = ("slo_attainment", "ttft_attainment", "tpot_attainment", "num_multiplexed", "num_rejected")
    # How busy the machine's cores were during the replay (client, routers, engines and all): near 1, the
    # components wait for a core and the comparison measures contention as much as decisions.
    cpu = {"cpu_busy_fraction": round((busy_after - busy_before) / max(total_after - total_before, 1.0), 3)}
    return {**{key: figures[key] for key in keys}, **cpu}


def _record_header(script: str, args: argparse.Namespace) -> dict[str, Any]:
    """The fields every replay benchmark's JSON starts with: its command, the trace, the engines, the load."""
    return {
        "schema_version": 1,
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "trace": TRACE,
        "profile": PROFILE,
        "roles": list(ROLES),
        "rate_per_s": args.rate,
        "num_requests": args.num_requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=7.0, help="mean request rate, req/s")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--interval-ms", type=float, default=50.0, help="how often routers read the live state")
    parser.add_argument("--ways", nargs="+", help="run only these ways (their labels)")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="shared-state-"))
    print(f"logs: {log_dir}")
    ways = [
        way
        for way in (
            ("one router", 1, 0.0),
            ("one router, live state", 1, args.interval_ms / 1e3),
            ("two routers, own counts", 2, 0.0),
            ("two routers, live state", 2, args.interval_ms / 1e3),
        )
        if not args.ways or way[0] in args.ways
    ]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in ways}
    for seed in args.seeds:
        for label, count, interval_s in ways:
            engines, engine_urls = _engines(log_dir)
            routers: list[ServerProcess] = []
            try:
                routers, router_urls = _routers(count, engine_urls, interval_s, log_dir)
                figures = _replay(router_urls, args, seed, label, log_dir)
            finally:
                for process in [*routers, *engines]:
                    process.stop()
            results[label].append({"seed": seed, **figures})
            print(
                f"seed {seed} {label:26s} joint {figures['slo_attainment']:6.1%}  TTFT "
                f"{figures['ttft_attainment']:6.1%}  TPOT {figures['tpot_attainment']:6.1%}  cores busy "
                f"{figures['cpu_busy_fraction']:.0%}",
                flush=True,
            )
    print(
        f"{TRACE}, {args.num_requests} requests at {args.rate:g} req/s, seeds {args.seeds}; 1 prefill + 2 multiplexing "
        f"fake engines ({PROFILE}, real speed); {os.cpu_count()} cores shared by the client, the routers and the "
        "engines, unpinned"
    )
    for label, runs in results.items():
        mean = statistics.mean(run["slo_attainment"] for run in runs)
        print(f"{label:26s} mean joint SLO attainment {mean:6.1%}")
    if args.json:
        record = {
            **_record_header("shared_state.py", args),
            "live_state_interval_s": args.interval_ms / 1e3,
            "machine": f"{os.cpu_count()} cores, shared by the replay client, the routers and the engines, unpinned",
            "ways": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
