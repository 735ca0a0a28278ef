"""Where the router's CPU goes (issue 17, item 4): sample ``tropical serve`` with py-spy under load and sort the
samples by the job they belong to.

The setup of ``benchmarks/router_overhead.py``: two instant fake engines, ``hey`` offering ``--rate`` streamed
8-token completions per second, the router on its one-call path (policy vllm over two colocated instances) and on
its P/D path (policy tropical, prefill-first). py-spy samples the router's Python stacks (``--rate`` Hz, only
while it runs: idle time is not sampled) for the middle of the load; each sample goes to the first category that
one of its frames matches, from the innermost frame out:

* HTTP server: aiohttp's server (request parsing, response writing, the chunked writer);
* HTTP client: aiohttp's client (connection pool, request writing, response reading);
* JSON and validation: json, orjson, pydantic;
* policy: ``tropical_sched.policies`` (the routing decision and the dispatcher);
* state, calibration, metrics: the router's per-instance state, online calibration, Prometheus;
* router data path: the rest of ``tropical_sched.serve`` (SSE scanning, relay, SLO headers, request lifecycle);
* event loop: samples with no Python frame below aiohttp's ``run_app`` (uvloop's C code: sockets, callbacks).

The router's CPU per request (``/proc``, the same run) times each category's share gives its milliseconds.

Needs ``hey`` and ``py-spy`` (``pip install py-spy``; it needs ptrace permission on the router). Usage:
    python benchmarks/router_profile.py [--rate 500] [--duration 12] [--json benchmarks/results/router-profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from router_overhead import _cpu_s, _hey, _stop, _wait, start_instant_engines, start_router

PATHS = {
    # name: (policy, policy options, roles)
    "one-call": ("vllm", {}, ("colocated", "colocated")),
    "pd": ("tropical", {"route_order": "prefill-first"}, ("prefill", "multiplexing")),
}
# (category, substrings of a frame's "function (file:line)" text), matched from the innermost frame out
CATEGORIES = (
    ("JSON and validation", ("json/", "orjson", "pydantic")),
    ("HTTP server", ("aiohttp/web", "aiohttp/http_writer", "aiohttp/http_parser", "aiohttp/base_protocol")),
    ("HTTP client", ("aiohttp/client", "aiohttp/connector", "aiohttp/streams", "aiohttp/payload", "aiohttp/helpers")),
    ("policy", ("tropical_sched/policies/", "tropical_sched/core/")),
    (
        "state, calibration, metrics",
        ("tropical_sched/serve/state", "tropical_sched/predictors/", "tropical_sched/serve/metrics", "prometheus"),
    ),
    ("router data path", ("tropical_sched/serve/", "tropical_sched/live_state")),
)
EVENT_LOOP = "event loop (uvloop, C)"


def categorize(stack: str) -> str:
    """The category of one py-spy raw stack (frames root first, ``;``-separated)."""
    frames = stack.split(";")
    if frames[-1].startswith("run_app (aiohttp/web.py"):  # inside the loop's C code, no Python frame below
        return EVENT_LOOP
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return EVENT_LOOP


def profile_path(name: str, rate: float, duration_s: float, sample_rate: int, workdir: Path) -> dict[str, object]:
    """One router path under load: its CPU per request and the share of its samples per category."""
    processes, engine_urls = start_instant_engines(workdir)
    policy, options, roles = PATHS[name]
    try:
        router, url = start_router(workdir, name, policy, options, engine_urls, roles)
        processes.append(router)
        _wait(url)
        _hey(url, 50.0, 2, 10)  # warm-up
        raw = workdir / f"{name}.raw.txt"
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        spy = [
            py_spy, "record", "--pid", str(router.pid), "--rate", str(sample_rate), "--duration",
            f"{max(1, int(duration_s) - 4)}", "--format", "raw", "--output", str(raw), "--nonblocking",
        ]  # fmt: skip

        def record() -> None:
            time.sleep(2)  # the middle of the load
            subprocess.run(spy, check=True, capture_output=True)

        recorder = threading.Thread(target=record)
        cpu_before_s = _cpu_s(router.pid)
        recorder.start()
        figures = _hey(url, rate, duration_s, max(1, round(rate / 50.0)))
        recorder.join()
        cpu_ms = (_cpu_s(router.pid) - cpu_before_s) / figures["ok"] * 1e3
    finally:
        for process in processes:
            _stop(process)
    counts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            category = categorize(stack)
            counts[category] = counts.get(category, 0) + int(count)
    total = sum(counts.values())
    shares = {category: counts.get(category, 0) / total for category in (*(c for c, _ in CATEGORIES), EVENT_LOOP)}
    return {
        "cpu_ms_per_request": cpu_ms,
        "achieved_rate_per_s": figures["achieved_rate_per_s"],
        "num_samples": total,
        "shares": shares,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="offered requests per second")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per path")
    parser.add_argument("--sample-rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="router-profile-"))
    results = {name: profile_path(name, args.rate, args.duration, args.sample_rate, workdir) for name in PATHS}
    print(f"router CPU by job at {args.rate:g} req/s offered ({os.cpu_count()} cores shared by all processes)")
    for name, result in results.items():
        cpu_ms = float(result["cpu_ms_per_request"])  # type: ignore[arg-type]
        print(f"{name}: {cpu_ms:.3f} ms CPU per request, {result['num_samples']} samples")
        for category, share in result["shares"].items():  # type: ignore[attr-defined]
            print(f"  {category:32s} {share:6.1%} {share * cpu_ms:7.3f} ms")
    if args.json:
        record = {
            "schema_version": 1,
            "command": "python benchmarks/router_profile.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} cores, shared by the load generator, the router and the engines",
            "rate_per_s": args.rate,
            "duration_s": args.duration,
            "sample_rate_per_s": args.sample_rate,
            "paths": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
