"""Router overhead: latency the Tropical router adds per request, and the rate it sustains, on 127.0.0.1.

Two fake engines (``tropical fake-engine``) with near-zero step times serve streaming completions. The same open
loop of requests (Poisson arrivals, 100-token prompts, 8 output tokens) is sent

* directly to the engines (client-side round robin): the baseline;
* through the Tropical router (``tropical serve``, policy tropical: it predicts, tracks and routes every request);
* through sglang-router 0.3.2 (Rust, round robin), the anchor, if ``--sglang-router`` points at its executable.

Every component runs in its own process. Added latency = the target's TTFT minus the baseline's, at P50 and P99.
On a 2-core machine the client, the router and both engines share the cores, so the figures are an upper bound
of what a router on its own cores adds.

Usage: python benchmarks/router_overhead.py [--rate 500] [--duration 20] [--sglang-router /path/to/sglang-router]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from tropical_sched.predictors import load_profile, time_scaled, write_profile_file
from tropical_sched.serve.openai import chunk_delta, iter_sse
from tropical_sched.serve.testing import free_port

TIME_SCALE = 1e-4  # the fakes run 10,000x faster than the profiled GPU: a 1,000-token prefill takes ~20 us


async def _load(urls: list[str], rate: float, duration_s: float, seed: int) -> dict[str, float]:
    """Open-loop Poisson load; returns TTFT percentiles (ms), achieved rate and errors."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, size=int(rate * duration_s))
    arrivals = np.cumsum(gaps)
    body = {"model": "fake-model", "prompt": list(range(10, 110)), "max_tokens": 8, "stream": True}
    ttfts: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=2048)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        start = time.perf_counter()

        async def one(index: int, at: float) -> None:
            nonlocal errors
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                async with client.stream("POST", urls[index % len(urls)] + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors += 1
                        await r.aread()
                        return
                    first = None
                    async for event in iter_sse(r):
                        if first is None and chunk_delta(event, 0).text:
                            first = time.perf_counter() - sent
                    if first is None:
                        errors += 1
                    else:
                        ttfts.append(first)
            except httpx.HTTPError:
                errors += 1

        await asyncio.gather(*(one(i, float(at)) for i, at in enumerate(arrivals)))
        elapsed = time.perf_counter() - start
    values = np.array(ttfts) * 1e3
    return {
        "requests": len(arrivals), "ok": len(ttfts), "errors": errors, "achieved_rate_per_s": len(ttfts) / elapsed,
        "ttft_p50_ms": float(np.percentile(values, 50)) if len(values) else float("nan"),
        "ttft_p99_ms": float(np.percentile(values, 99)) if len(values) else float("nan"),
    }


def _wait(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per target")
    parser.add_argument("--sglang-router", help="path of the sglang-router executable (the anchor)")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()

    tropical = [sys.executable, "-m", "tropical_sched.cli.main"]
    workdir = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    profile_path = workdir / "profile.json"
    write_profile_file(time_scaled(load_profile("a100-llama2-70b-tp4").file, TIME_SCALE), profile_path)
    ports = [free_port(), free_port()]
    engines = [
        _start([*tropical, "fake-engine", "--port", str(port), "--time-scale", str(TIME_SCALE), "--engine-id", f"e{i}"])
        for i, port in enumerate(ports)
    ]
    engine_urls = [f"http://127.0.0.1:{port}" for port in ports]
    processes = list(engines)
    results: dict[str, dict[str, float]] = {}
    try:
        for url in engine_urls:
            _wait(url)
        targets: list[tuple[str, list[str], subprocess.Popen[bytes] | None]] = [("direct", engine_urls, None)]

        router_port = free_port()
        config = workdir / "cluster.yaml"
        config.write_text(json.dumps({
            "policy": "tropical", "profile": str(profile_path), "model": "fake-model",
            "instances": [{"url": engine_urls[0], "role": "prefill"}, {"url": engine_urls[1], "role": "multiplexing"}],
        }))
        router = _start([*tropical, "serve", "--config", str(config), "--port", str(router_port),
                         "--log-level", "warning"])
        processes.append(router)
        targets.append(("tropical router", [f"http://127.0.0.1:{router_port}"], router))

        if args.sglang_router:
            sgl_port = free_port()
            sgl = _start([args.sglang_router, "launch", "--worker-urls", *engine_urls, "--policy", "round_robin",
                          "--port", str(sgl_port), "--host", "127.0.0.1"])
            processes.append(sgl)
            targets.append(("sglang-router (round robin)", [f"http://127.0.0.1:{sgl_port}"], sgl))

        for name, urls, _ in targets:
            _wait(urls[0], timeout_s=60)
            asyncio.run(_load(urls, min(args.rate, 50), 2, seed=1))  # warm-up: connections, caches
            results[name] = asyncio.run(_load(urls, args.rate, args.duration, seed=0))
    finally:
        for process in processes:
            _stop(process)

    base = results["direct"]
    print(f"open-loop Poisson load at {args.rate:g} req/s for {args.duration:g} s per target; streaming, 100-token "
          f"prompts, 8 output tokens; 2 fake engines (near-zero step times)")
    print(f"{'target':30s} {'ok':>6s} {'errors':>7s} {'req/s':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'added p50':>10s} {'added p99':>10s}")
    for name, r in results.items():
        added50 = r["ttft_p50_ms"] - base["ttft_p50_ms"]
        added99 = r["ttft_p99_ms"] - base["ttft_p99_ms"]
        print(f"{name:30s} {r['ok']:6.0f} {r['errors']:7.0f} {r['achieved_rate_per_s']:7.1f} "
              f"{r['ttft_p50_ms']:7.2f}ms {r['ttft_p99_ms']:7.2f}ms {added50:8.2f}ms {added99:8.2f}ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
