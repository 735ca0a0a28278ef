"""Deciding in Python while a Rust gateway carries the bytes (issue 17, item 4): what that split would cost.

A gateway in front of the engines (sglang-router 0.3.2, Rust) asks a Python decider where each request goes and
pins it there by header (``x-smg-target-worker``, sglang-router's documented pin); the decider
(``benchmarks/split_decider.py``) runs Tropical's validation, SLO headers and policy over the engines' live state
and never sees the answer's bytes. Its two hops are measured apart, with ``hey`` on the same instant engines and
rates as ``benchmarks/router_overhead.py``:

* the decider: ``POST /decide`` with the client's body (the gateway's call to it; a small JSON answer);
* the gateway: streamed 8-token completions through sglang-router with the pin header (any pin counters on its
  Prometheus page are recorded; 0.3.2's page has none, so the run does not check that the pin held).

The split's cost per request is the sum: CPU of both processes, added latency of both hops (the gateway's call to
the decider would add a loopback round trip more, not measured here). Against it: ``tropical serve`` on its
one-call path in ``benchmarks/results/router-overhead.json``.

Usage: python benchmarks/router_split.py --sglang-router PATH [--rates 100 500 1000] [--duration 10]
           [--repeats 3] [--json benchmarks/results/router-split.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
from router_overhead import BODY, _cpu_s, _median, _start, _stop, _wait, start_instant_engines
from router_overhead import _hey as hey

from tropical_sched.serve.testing import free_port

HERE = Path(__file__).resolve().parent
PIN_HEADER = "x-smg-target-worker"


def _hey(url: str, path: str, rate: float, duration_s: float, headers: list[str]) -> dict[str, float]:
    return hey(url, rate, duration_s, max(1, round(rate / 50.0)), path, tuple(headers))


def _pin_hits(metrics_url: str) -> dict[str, float]:
    """sglang-router's target-worker counters (hits and misses of the pin header)."""
    text = httpx.get(metrics_url, timeout=5).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(\S*target_worker\S*?)(\{[^}]*\})? (\S+)$", line)
        if match:
            counts[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sglang-router", required=True, help="path of the sglang-router executable")
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 500.0, 1000.0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per target and rate")
    parser.add_argument("--repeats", type=int, default=1, help="runs per target and rate (figures: their median)")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()

    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="router-split-"))
    processes, engine_urls = start_instant_engines(workdir)
    try:
        config = workdir / "cluster.json"
        instances = [{"url": url, "role": "multiplexing"} for url in engine_urls]
        config.write_text(json.dumps({"policy": "tropical", "model": "fake-model", "instances": instances}))
        decider_port, gateway_port, prometheus_port = free_port(), free_port(), free_port()
        processes.append(
            _start([python, str(HERE / "split_decider.py"), str(decider_port), str(config)], workdir / "decider.log")
        )
        decider = processes[-1]
        gateway_command = [args.sglang_router, "launch", "--worker-urls", *engine_urls, "--policy", "round_robin"]
        gateway_command += ["--host", "127.0.0.1", "--port", str(gateway_port)]
        gateway_command += ["--prometheus-port", str(prometheus_port)]
        processes.append(_start(gateway_command, workdir / "gateway.log"))
        gateway = processes[-1]
        decider_url, gateway_url = f"http://127.0.0.1:{decider_port}", f"http://127.0.0.1:{gateway_port}"
        _wait(engine_urls[0])
        _wait(gateway_url)
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.post(decider_url + "/decide", json=BODY, timeout=2)
                if answer.status_code == 200 and answer.json()["worker_url"] in engine_urls:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the decider did not answer (logs in {workdir})")
            time.sleep(0.3)
        pin = [f"{PIN_HEADER}: {engine_urls[1]}"]
        targets = {
            "direct (one engine)": (engine_urls[0], "/v1/completions", [], None),
            "decider (Python: validation, SLO headers, policy)": (decider_url, "/decide", [], decider.pid),
            "gateway (sglang-router, pinned by header)": (gateway_url, "/v1/completions", pin, gateway.pid),
        }
        metrics_url = f"http://127.0.0.1:{prometheus_port}/metrics"
        hits_before = _pin_hits(metrics_url)
        for url, path, headers, _ in targets.values():
            _hey(url, path, 50.0, 2, headers)  # warm-up
        runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in targets}
        for _ in range(args.repeats):
            for name, (url, path, headers, pid) in targets.items():
                for rate in args.rates:
                    cpu_before_s = _cpu_s(pid) if pid else 0.0
                    figures = _hey(url, path, rate, args.duration, headers)
                    if pid and figures.get("ok"):
                        figures["cpu_ms_per_request"] = (_cpu_s(pid) - cpu_before_s) / figures["ok"] * 1e3
                    runs[name].setdefault(f"{rate:g}", []).append(figures)
        hits = {k: v - hits_before.get(k, 0.0) for k, v in _pin_hits(metrics_url).items()}
        results = {name: {rate: _median(f) for rate, f in by_rate.items()} for name, by_rate in runs.items()}
    finally:
        for process in processes:
            _stop(process)

    print(f"hey: {args.duration:g} s per target and rate, median of {args.repeats} run(s); instant fake engines; "
          f"{os.cpu_count()} cores shared by all processes; pin counters: {hits}")  # fmt: skip
    base = results["direct (one engine)"]
    split: dict[str, dict[str, float]] = {}
    for rate in base:
        decider_figures = results["decider (Python: validation, SLO headers, policy)"][rate]
        gateway_figures = results["gateway (sglang-router, pinned by header)"][rate]
        split[rate] = {
            "cpu_ms_per_request": decider_figures["cpu_ms_per_request"] + gateway_figures["cpu_ms_per_request"],
            "added_latency_p50_ms": decider_figures["latency_p50_ms"]
            + gateway_figures["latency_p50_ms"]
            - base[rate]["latency_p50_ms"],
            "added_latency_p99_ms": decider_figures["latency_p99_ms"]
            + gateway_figures["latency_p99_ms"]
            - base[rate]["latency_p99_ms"],
        }
    for name, by_rate in results.items():
        for rate, r in by_rate.items():
            cpu = f"{r['cpu_ms_per_request']:.3f}" if "cpu_ms_per_request" in r else "-"
            print(f"{name:52s} {rate:>6s} req/s: p50 {r.get('latency_p50_ms', float('nan')):6.2f} ms, "
                  f"p99 {r.get('latency_p99_ms', float('nan')):6.2f} ms, CPU {cpu} ms/req, "
                  f"achieved {r.get('achieved_rate_per_s', 0):.0f}/s, errors {r['errors']:.0f}")  # fmt: skip
    for rate, figures in split.items():
        cpu_ms, p50_ms, p99_ms = (
            figures[k] for k in ("cpu_ms_per_request", "added_latency_p50_ms", "added_latency_p99_ms")
        )
        print(f"split (decider + gateway) {rate:>6s} req/s: CPU {cpu_ms:.3f} ms/req, added p50 {p50_ms:.2f} ms, "
              f"p99 {p99_ms:.2f} ms")  # fmt: skip
    if args.json:
        record = {
            "schema_version": 1,
            "command": "python benchmarks/router_split.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} cores, shared by the load generator, the decider, the gateway and the "
            "engines",
            "duration_s": args.duration,
            "repeats": args.repeats,
            "num_output_tokens": BODY["max_tokens"],
            "pin_counters": hits,
            "targets": results,
            "split": split,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
