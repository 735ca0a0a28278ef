"""Router overhead: latency the Tropical router adds per request, and the rate it sustains, on 127.0.0.1.

Two instant fake engines (``benchmarks/instant_engine.py``: raw ASGI, answer at once with 8 streamed tokens) sit
behind each target, and the same load is sent with ``hey`` (Go; ``-c`` workers each rate-limited to ``-q``
requests per second, so ``c x q`` is the offered rate; workers are closed-loop, so a saturated target shows as an
achieved rate below the offered one): directly to one engine (the baseline), through the Tropical
router on its P/D path (policy tropical, prefill-first: a prefill call and a decode call per request) and with one
upstream call per request (policy vllm over two colocated workers: the code path of a multiplexed request), and
through sglang-router 0.3.2 and vllm-router 0.1.17 (both Rust, round robin) as anchors, and through a bare
Python pass-through proxy (``benchmarks/passthrough_proxy.py``: aiohttp server and client on uvloop, round robin,
no parsing, no policy, no metrics), the floor of any Python data path on the same machine.
Because the engines answer at once, a request's total latency is its TTFT plus microseconds; added latency = the
target's latency minus the baseline's, at P50 and P99, at each offered rate of ``--rates``. The router's own CPU
time per request (user + system, from /proc) is the figure that carries to other machines: one core sustains about
1 / that many requests per second. Every component is its own process; on a 2-core machine the load generator,
the router and the engines share the cores, so the latencies bound from above what a router on its own cores adds.

With ``--repeats N`` every target and rate is run N times, in rounds (each round runs every target once, so a
drift of the machine's speed reaches every target alike), and each figure is the median of its N runs.

Needs ``hey`` (Debian: apt-get install hey). Usage:
    python benchmarks/router_overhead.py [--rates 100 500 1000] [--duration 10] [--repeats 3]
        [--sglang-router PATH] [--vllm-router PATH] [--json benchmarks/results/router-overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tropical_sched.serve.testing import free_port

HERE = Path(__file__).resolve().parent
BODY = {"model": "fake-model", "prompt": "word " * 80, "max_tokens": 8, "stream": True}  # ~100 tokens of text


def _hey(
    url: str, rate: float, duration_s: float, workers: int, path: str = "/v1/completions", headers: tuple[str, ...] = ()
) -> dict[str, float]:
    """Run hey against ``url + path`` with BODY (and ``headers``, ``Name: value``); returns latency percentiles
    (ms), achieved rate and non-200 answers."""
    body_file = Path(tempfile.mkstemp(suffix=".json")[1])
    body_file.write_text(json.dumps(BODY))
    command = [
        "hey",
        "-z",
        f"{duration_s}s",
        "-c",
        str(workers),
        "-q",
        f"{rate / workers:g}",
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body_file),
        *(arg for header in headers for arg in ("-H", header)),
        url + path,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    figures: dict[str, float] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            figures["achieved_rate_per_s"] = float(line.split()[1])
        for pct in ("50", "90", "99"):
            if line.startswith(f"{pct}% in"):
                figures[f"latency_p{pct}_ms"] = float(line.split()[2]) * 1e3
        if line.startswith("[") and "responses" in line:
            status, count = line[1:].split("]")[0], int(line.split()[1])
            key = "ok" if status == "200" else "errors"
            figures[key] = figures.get(key, 0) + count
        if line.startswith("Error distribution:"):
            figures.setdefault("errors", 0)
    figures.setdefault("errors", 0)
    return figures


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over ``runs`` (a figure missing from a run, such as a percentile ``hey`` did not print
    for a run without answers, is left out of that figure's median)."""
    keys = {key for run in runs for key in run}
    return {key: statistics.median(run[key] for run in runs if key in run) for key in sorted(keys)}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children that were waited for (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _wait(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + "/v1/completions", json={**BODY, "stream": False}, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer a completion (logs in the benchmark's temporary folder)")


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def start_instant_engines(workdir: Path, count: int = 2) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``count`` instant engines (``instant_engine.py``) on free ports, logging under ``workdir``: the processes
    and their URLs (wait for them with :func:`_wait`)."""
    ports = [free_port() for _ in range(count)]
    processes = [
        _start([sys.executable, str(HERE / "instant_engine.py"), str(port)], workdir / f"engine-{port}.log")
        for port in ports
    ]
    return processes, [f"http://127.0.0.1:{port}" for port in ports]


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def start_router(
    workdir: Path, name: str, policy: str, options: dict[str, object], engine_urls: list[str], roles: tuple[str, ...]
) -> tuple[subprocess.Popen[bytes], str]:
    """``tropical serve`` with ``policy`` over the engines (one role each), metrics polling off; its process and
    URL."""
    port = free_port()
    config = workdir / f"{name}.yaml"
    instances = [{"url": url, "role": role} for url, role in zip(engine_urls, roles, strict=True)]
    cluster = {"policy": policy, "model": "fake-model", "policy_options": options, "metrics_interval_s": 0}
    config.write_text(json.dumps({**cluster, "instances": instances}))
    serve = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    process = _start([sys.executable, "-m", "tropical_sched.cli.main", *serve], workdir / f"router-{name}.log")
    return process, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[100.0, 500.0, 1000.0],
        help="offered requests per second, one run per rate and target",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per target and rate")
    parser.add_argument("--repeats", type=int, default=1, help="runs per target and rate (figures: their median)")
    parser.add_argument(
        "--workers-rate",
        type=float,
        default=50.0,
        help="requests per second per hey worker: -c is rate / this. hey's workers start together "
        "and tick in step, so c workers send bursts of c requests; few fast workers keep the "
        "bursts small",
    )
    parser.add_argument("--sglang-router", help="path of the sglang-router executable (the anchor)")
    parser.add_argument("--vllm-router", help="path of the vllm-router executable (PyPI vllm-router, Rust)")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()

    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    processes, engine_urls = start_instant_engines(workdir)
    targets: list[tuple[str, str, int | None]] = [("direct (one engine)", engine_urls[0], None)]
    try:
        # P/D path: tropical with a prefill and a multiplexing worker, prefill-first (two upstream calls per
        # request). One-call path: the router with the colocated vllm policy over both engines (one upstream call,
        # the same code path as a multiplexed request; tropical itself needs a prefill worker).
        for name, policy, options, roles, label in (
            ("pd", "tropical", {"route_order": "prefill-first"}, ("prefill", "multiplexing"), "tropical, P/D path"),
            ("one-call", "vllm", {}, ("colocated", "colocated"), "router, one call (vllm policy)"),
        ):
            router, url = start_router(workdir, name, policy, options, engine_urls, roles)
            processes.append(router)
            targets.append((label, url, router.pid))
        # The Rust routers, round robin over the same engines: (label, executable, arguments before the common ones)
        rust_routers = (
            ("sglang-router", args.sglang_router, ["launch"], ["--prometheus-port", str(free_port())]),
            ("vllm-router", args.vllm_router, [], []),
        )
        port = free_port()
        processes.append(
            _start([python, str(HERE / "passthrough_proxy.py"), str(port), *engine_urls], workdir / "passthrough.log")
        )
        targets.append(("pass-through proxy (aiohttp)", f"http://127.0.0.1:{port}", processes[-1].pid))
        for name, executable, before, after in rust_routers:
            if not executable:
                continue
            port = free_port()
            common = ["--worker-urls", *engine_urls, "--policy", "round_robin", "--port", str(port)]
            processes.append(
                _start([executable, *before, *common, "--host", "127.0.0.1", *after], workdir / f"{name}.log")
            )
            targets.append((f"{name}, round robin", f"http://127.0.0.1:{port}", processes[-1].pid))
        runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name, _, _ in targets}
        print(f"logs: {workdir}")
        for _, url, _ in targets:
            _wait(url)
            _hey(url, 50.0, 2, 10)  # warm-up
        for _ in range(args.repeats):
            for name, url, pid in targets:
                for rate in args.rates:
                    cpu_before_s = _cpu_s(pid) if pid else 0.0
                    figures = _hey(url, rate, args.duration, max(1, round(rate / args.workers_rate)))
                    if pid and figures.get("ok"):
                        figures["cpu_ms_per_request"] = (_cpu_s(pid) - cpu_before_s) / figures["ok"] * 1e3
                    runs[name].setdefault(f"{rate:g}", []).append(figures)
        results = {
            name: {rate: _median(figures) for rate, figures in by_rate.items()} for name, by_rate in runs.items()
        }
    finally:
        for process in processes:
            _stop(process)

    print(
        f"hey: rate / {args.workers_rate:g} workers, {args.duration:g} s per target and rate, median of "
        f"{args.repeats} run(s); "
        f"streaming completions of 8 tokens; instant fake engines; {os.cpu_count()} cores shared by all processes"
    )
    print(
        f"{'target':34s} {'offered':>7s} {'ok':>6s} {'errors':>6s} {'req/s':>6s} {'p50 ms':>7s} {'p99 ms':>8s} "
        f"{'added p50':>9s} {'added p99':>9s} {'CPU ms/req':>10s}"
    )
    for name, by_rate in results.items():
        for rate, r in by_rate.items():
            base = results["direct (one engine)"][rate]
            cpu = f"{r['cpu_ms_per_request']:10.2f}" if "cpu_ms_per_request" in r else f"{'-':>10s}"
            if "latency_p50_ms" not in r or "latency_p99_ms" not in r:
                print(f"{name:34s} {rate:>7s} {r.get('ok', 0):6.0f} {r['errors']:6.0f}  (no latency figures)")
                continue
            print(
                f"{name:34s} {rate:>7s} {r.get('ok', 0):6.0f} {r['errors']:6.0f} "
                f"{r.get('achieved_rate_per_s', 0):6.1f} "
                f"{r['latency_p50_ms']:7.2f} {r['latency_p99_ms']:8.2f} "
                f"{r['latency_p50_ms'] - base['latency_p50_ms']:9.2f} "
                f"{r['latency_p99_ms'] - base['latency_p99_ms']:9.2f} {cpu}"
            )
    if args.json:
        record = {
            "schema_version": 1,
            "command": "python benchmarks/router_overhead.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} cores, shared by the load generator, the target and the engines",
            "duration_s": args.duration,
            "repeats": args.repeats,
            "workers_rate_per_s": args.workers_rate,
            "num_output_tokens": BODY["max_tokens"],
            "targets": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
