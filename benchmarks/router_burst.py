"""A burst through the router with an engine killed and restarted mid-run: is every request answered, is any lost?

One prefill and two multiplexing fake engines (``tropical fake-engine``, the A100 Llama-2-70B profile run 100x
faster) sit behind ``tropical serve`` (policy tropical); every component is its own process on 127.0.0.1. The
client keeps ``--concurrency`` requests in flight (closed loop, one connection pool) until ``--num-requests`` have
been sent, a mix of streamed and plain completions of 20-600 prompt tokens and 1-16 output tokens. After
``--kill-after`` requests it SIGKILLs one multiplexing engine and starts it again ``--down-s`` seconds later.

It prints, and writes as JSON with ``--json``: requests answered with 200, answered with another status (by
status), lost (no HTTP status at all: a connection error before any response header), streams cut after their
200, and what the router counts at the end (``requests_total`` by outcome, requests still in flight and waiting).
A lost request is one the router never answered; "in flight at the end" must be 0.

Usage: python benchmarks/router_burst.py [--num-requests 10000] [--concurrency 400] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tropical_sched.predictors import load_profile, time_scaled, write_profile_file
from tropical_sched.serve.testing import ServerProcess, free_port

TIME_SCALE = 0.01
TROPICAL = [sys.executable, "-m", "tropical_sched.cli.main"]


def _engine(port: int, role: str, profile: str | Path, log_dir: Path) -> ServerProcess:
    """A ``tropical fake-engine`` of ``role`` (Tropical's engine-side scheduler) on ``port``, its log in
    ``log_dir``."""
    command = [
        *TROPICAL,
        "fake-engine",
        "--profile",
        str(profile),
        "--port",
        str(port),
        "--policy",
        "tropical",
        "--role",
        role,
        "--engine-id",
        f"{role}-{port}",
    ]
    return ServerProcess(command, log_dir / f"engine-{port}-{time.monotonic_ns()}.log")


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random, outcome: Counter[str]) -> None:
    stream = rng.random() < 0.5
    body = {
        "prompt": [rng.randrange(10, 250) for _ in range(rng.randrange(20, 600))],
        "max_tokens": rng.randrange(1, 17),
        "stream": stream,
    }
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            content = await response.aread()
            if response.status_code != 200:
                outcome[f"status {response.status_code}"] += 1
                return
            if stream and b"data: [DONE]" not in content:
                outcome["stream cut after 200"] += 1
                return
            if stream and b'"error"' in content:
                outcome["stream ended with an error event"] += 1
                return
            outcome["ok"] += 1
    except httpx.HTTPError as exc:
        outcome[f"lost: {type(exc).__name__}"] += 1


async def _burst(url: str, args: argparse.Namespace, on_count: Any) -> tuple[Counter[str], float]:
    outcome: Counter[str] = Counter()
    sent = 0
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def worker(seed: int) -> None:
            nonlocal sent
            rng = random.Random(seed)
            while sent < args.num_requests:
                sent += 1
                await on_count(sent)
                await _one(client, url, rng, outcome)

        started = time.monotonic()
        await asyncio.gather(*(worker(seed) for seed in range(args.concurrency)))
        return outcome, time.monotonic() - started


def _router_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "tropical_router_requests_total":
                key = f"requests_total{{{sample.labels['route']},{sample.labels['outcome']}}}"
                counts[key] = sample.value
            elif sample.name == "tropical_router_requests_in_flight":
                counts["in_flight"] = counts.get("in_flight", 0.0) + sample.value
            elif sample.name == "tropical_router_requests_waiting":
                counts["waiting"] = sample.value
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--kill-after", type=int, default=3_000, help="requests sent before the engine is killed")
    parser.add_argument("--down-s", type=float, default=2.0, help="seconds before the killed engine restarts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="router-burst-"))
    profile = work / "profile.json"
    write_profile_file(time_scaled(load_profile("a100-llama2-70b-tp4").file, TIME_SCALE), profile)
    ports = [free_port() for _ in range(4)]
    roles = ["prefill", "multiplexing", "multiplexing"]
    engines = [_engine(port, role, profile, work) for port, role in zip(ports, roles, strict=False)]
    config = work / "cluster.yaml"
    config.write_text(
        json.dumps(
            {
                "policy": "tropical",
                "profile": str(profile),
                "health_interval_s": 0.5,
                "instances": [
                    {"url": f"http://127.0.0.1:{port}", "role": role} for port, role in zip(ports, roles, strict=False)
                ],
            }
        )
    )
    router_url = f"http://127.0.0.1:{ports[3]}"
    router = ServerProcess([*TROPICAL, "serve", "--config", str(config), "--port", str(ports[3])], work / "router.log")
    killed = {"at_s": None, "restarted_at_s": None}
    started = time.monotonic()
    try:
        for engine, port in zip(engines, ports, strict=False):
            engine.wait_healthy(f"http://127.0.0.1:{port}", timeout_s=60)
        router.wait_healthy(router_url, timeout_s=60)

        async def on_count(count: int) -> None:
            if count == args.kill_after:
                os.killpg(engines[2].process.pid, signal.SIGKILL)
                killed["at_s"] = time.monotonic() - started

                async def restart() -> None:
                    await asyncio.sleep(args.down_s)
                    engines[2] = _engine(ports[2], roles[2], profile, work)
                    killed["restarted_at_s"] = time.monotonic() - started

                asyncio.get_running_loop().create_task(restart())

        outcome, elapsed_s = asyncio.run(_burst(router_url, args, on_count))
        time.sleep(1.0)  # let the last requests leave the router's books
        counts = _router_counts(router_url)
    finally:
        router.stop()
        for engine in engines:
            engine.stop()
    lost = sum(v for k, v in outcome.items() if k.startswith("lost"))
    answered = sum(v for k, v in outcome.items() if not k.startswith("lost"))
    result = {
        "schema_version": 1,
        "num_requests": args.num_requests,
        "concurrency": args.concurrency,
        "elapsed_s": round(elapsed_s, 2),
        "engine_killed_at_s": killed["at_s"],
        "engine_restarted_at_s": killed["restarted_at_s"],
        "answered": answered,
        "ok": outcome["ok"],
        "lost": lost,
        "outcomes": dict(sorted(outcome.items())),
        "router": counts,
        "router_counted": sum(v for k, v in counts.items() if k.startswith("requests_total")),
        "cores": f"{os.cpu_count()} shared by the client, the router and three fake engines",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
