"""Online calibration from outside: how far the router's learned step times and P/D hop are from the engines' real
ones after N requests, for engines that run 10x slower or 10x faster than the profile the router is given.

Two fake engines (``tropical fake-engine``, the A100 Llama-2-70B profile run at ``--engine-scale`` of its times, a
prefill one and a multiplexing one that adds a P/D hop with ``--pd-hop-ms`` / ``--pd-hop-per-token-ms``) sit behind
``tropical serve`` (policy tropical, prefill-first, so every request is prefilled on the one and decoded on the
other); every component is its own process on 127.0.0.1. The router is given the same profile scaled by
``engine_scale / off`` for each ``off`` of ``--offs`` (10: the engines are 10x slower than the router believes;
0.1: 10x faster; 1: the profile is right). Requests arrive as a Poisson process at ``--rate`` (100-800 prompt
tokens, 4-16 output tokens, SLO headers loose enough never to bind). At each checkpoint of ``--checkpoints`` the
script reads ``GET /v1/tropical/profile?instance=URL`` for both instances, as any client could, and prints the
largest relative error over a grid of the engines' own work:

* prefill: ``T_pf(L)`` of the prefill instance for L in 128, 256, 512, 800 tokens;
* decode: the multiplexing instance's decode step at 1, 2, 4, 8 sequences of 300 and 800 context tokens each;
* hop: the P/D hop learned for the prefill instance, ``fixed + per_token * L``, for L in 128, 512, 800;

next to the error of the offline profile the router started from. The engines' steps (decode 13-15 ms, prefill
20-70 ms at the default scale) are well above what HTTP adds per token (a few tenths of a millisecond), so what is
learned is the engine; a prefill that ran alone is timed from the router, less the instance's bare HTTP round trip
(its ``GET /health``), so prefills keep what the engine's server adds to a request beyond that (about 1 ms here).

Usage: python benchmarks/calibration.py [--offs 10 0.1 1] [--checkpoints 50 100 200 300] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tropical_sched.predictors import Profile, ProfileFile, load_profile, time_scaled, write_profile_file
from tropical_sched.serve.testing import ServerProcess, free_port

TROPICAL = [sys.executable, "-m", "tropical_sched.cli.main"]
PROFILE = "a100-llama2-70b-tp4"
PREFILL_TOKENS = (128, 256, 512, 800)
DECODE_BATCHES = [(d, d * c) for d in (1, 2, 4, 8) for c in (300, 800)]
HOP_TOKENS = (128, 512, 800)
NO_SLO = {"x-slo-ttft-ms": "600000", "x-slo-tpot-ms": "600000"}


def _errors(prefill: Profile, mux: Profile, engine: Profile, hop_fixed_s: float, hop_per_token_s: float) -> dict:
    """Largest relative errors (predicted / real - 1, signed) of the prefills, decode steps and hops."""

    def worst(pairs: list[tuple[float, float]]) -> float:
        return max((p / t - 1 for p, t in pairs), key=abs)

    real = engine.step_time
    return {
        "prefill": worst([(prefill.step_time.prefill_time_s(n), real.prefill_time_s(n)) for n in PREFILL_TOKENS]),
        "decode": worst(
            [(mux.step_time.decode_step_time_s(b, c), real.decode_step_time_s(b, c)) for b, c in DECODE_BATCHES]
        ),
        "hop": worst([(prefill.serving.pd_hop_s(n), hop_fixed_s + hop_per_token_s * n) for n in HOP_TOKENS]),
    }


async def _send(url: str, num_requests: int, rate_per_s: float, rng: random.Random) -> int:
    """Poisson arrivals; returns the number of requests that failed."""
    failed = 0
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(body: dict[str, Any]) -> None:
            nonlocal failed
            try:
                response = await client.post(url + "/v1/completions", json=body, headers=NO_SLO)
                failed += response.status_code != 200
            except httpx.HTTPError:
                failed += 1

        tasks = []
        for _ in range(num_requests):
            body = {
                "model": "fake-model",
                "prompt": [rng.randrange(10, 1000) for _ in range(rng.randint(100, 800))],
                "max_tokens": rng.randint(4, 16),
            }
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(rng.expovariate(rate_per_s))
        await asyncio.gather(*tasks)
    return failed


def _calibrated(router_url: str, instance_url: str) -> Profile:
    response = httpx.get(router_url + "/v1/tropical/profile", params={"instance": instance_url}, timeout=10)
    response.raise_for_status()
    return Profile(ProfileFile.model_validate(response.json()))


def run_case(off: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One deployment whose engines run ``off`` times slower than the router's profile says."""
    base = load_profile(PROFILE)
    engine = Profile(time_scaled(base.file, args.engine_scale))
    router_profile = workdir / f"router-profile-{off:g}.json"
    write_profile_file(time_scaled(base.file, args.engine_scale / off), router_profile)
    ports = [free_port(), free_port(), free_port()]
    hop = ["--pd-hop-ms", f"{args.pd_hop_ms:g}", "--pd-hop-per-token-ms", f"{args.pd_hop_per_token_ms:g}"]
    processes = []
    try:
        for port, role, extra in ((ports[0], "prefill", []), (ports[1], "multiplexing", hop)):
            command = [
                *TROPICAL,
                "fake-engine",
                "--profile",
                PROFILE,
                "--time-scale",
                f"{args.engine_scale:g}",
                "--port",
                str(port),
                "--policy",
                "tropical",
                "--role",
                role,
                *extra,
            ]
            processes.append(ServerProcess(command, workdir / f"engine-{role}-{off:g}.log"))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        config = workdir / f"cluster-{off:g}.yaml"
        config.write_text(
            json.dumps(
                {
                    "profile": str(router_profile),
                    "model": "fake-model",
                    "policy_options": {"route_order": "prefill-first"},
                    "instances": [{"url": urls[0], "role": "prefill"}, {"url": urls[1], "role": "multiplexing"}],
                }
            )
        )
        serve = [*TROPICAL, "serve", "--config", str(config), "--port", str(ports[2]), "--log-level", "warning"]
        processes.append(ServerProcess(serve, workdir / f"router-{off:g}.log"))
        for process, url in zip(processes, urls, strict=True):
            process.wait_healthy(url, timeout_s=60)
        hop_fixed_s, hop_per_token_s = args.pd_hop_ms / 1e3, args.pd_hop_per_token_ms / 1e3
        offline = Profile(time_scaled(base.file, args.engine_scale / off))
        rows = [{"requests": 0, **_errors(offline, offline, engine, hop_fixed_s, hop_per_token_s)}]
        rng = random.Random(args.seed)
        sent = failed = 0
        started = time.monotonic()
        for checkpoint in args.checkpoints:
            failed += asyncio.run(_send(urls[2], checkpoint - sent, args.rate, rng))
            sent = checkpoint
            prefill, mux = _calibrated(urls[2], urls[0]), _calibrated(urls[2], urls[1])
            rows.append({"requests": sent, **_errors(prefill, mux, engine, hop_fixed_s, hop_per_token_s)})
        return {"off": off, "rows": rows, "failed": failed, "wall_s": time.monotonic() - started}
    finally:
        for process in processes:
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offs", type=float, nargs="+", default=[10.0, 0.1, 1.0], help="engine / profile time")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[50, 100, 200, 300])
    parser.add_argument("--engine-scale", type=float, default=0.3, help="the engines' times / the A100 profile's")
    parser.add_argument("--pd-hop-ms", type=float, default=80.0)
    parser.add_argument("--pd-hop-per-token-ms", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="calibration-"))
    print(f"logs: {workdir}")
    results = [run_case(off, args, workdir) for off in args.offs]
    print(
        f"engines: {PROFILE} x{args.engine_scale:g}; P/D hop {args.pd_hop_ms:g} ms + {args.pd_hop_per_token_ms:g} ms "
        f"per prompt token; {args.rate:g} requests/s; largest relative error (learned / real - 1) over the grid"
    )
    print(f"{'engines vs profile':>20s} {'requests':>8s} {'prefill':>8s} {'decode':>8s} {'P/D hop':>8s}")
    for case in results:
        label = f"{case['off']:g}x {'slower' if case['off'] > 1 else 'faster' if case['off'] < 1 else '(right)'}"
        for row in case["rows"]:
            name = "offline" if row["requests"] == 0 else str(row["requests"])
            print(f"{label:>20s} {name:>8s} {row['prefill']:+8.1%} {row['decode']:+8.1%} {row['hop']:+8.1%}")
        if case["failed"]:
            print(f"{'':>20s} {case['failed']} requests failed")
    if args.json:
        Path(args.json).write_text(json.dumps({"schema_version": 1, "args": vars(args), "cases": results}, indent=2))


if __name__ == "__main__":
    main()
