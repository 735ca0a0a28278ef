"""Tropical through Ray Serve against ``tropical serve``, on the same engines and the same load.

One prefill and two multiplexing fake engines (as in ``benchmarks/shared_state.py``: the A100 Llama-2-70B TP4
profile at real speed, Tropical's engine-side scheduler) are fronted two ways, each on fresh engines: by
``tropical serve`` (policy tropical), and by the Ray Serve application of the same cluster description
(``tropical_sched.integrations.ray_serve.build_tropical_app``: a local Ray cluster on 127.0.0.1, Tropical's request
router, replicas reporting their engines' live state every ``--stats-period-ms``). ``tropical replay`` sends the
same trace to each and the joint SLO attainment is compared. Then the added latency of each path: ``--probes``
sequential short requests (8 prompt tokens, 1 output token) to an engine directly, through ``tropical serve``
and through Ray Serve, each path's median end-to-end time less the engine's.

Run with the Ray environment's Python (``.venv-ray``, see .ci/run). Usage:
    .venv-ray/bin/python benchmarks/ray_serve.py [--rate 7] [--num-requests 300] [--seeds 0 1]
        [--json benchmarks/results/ray-serve/fake-engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
from shared_state import PROFILE, ROLES, TRACE, _engines, _record_header, _replay, _routers

from tropical_sched.serve.testing import ServerProcess, free_port


def start_ray_app(
    config: dict[str, Any], stats_period_s: float, *, direct_ingress: bool = False, throughput_optimized: bool = False
) -> str:
    """A local Ray cluster on 127.0.0.1 serving ``build_tropical_app(config)``; its URL (stop it with
    :func:`ray_down`).

    ``direct_ingress``: Ray Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, experimental in 2.60):
    the ingress replica serves HTTP itself on a free port (``direct_ingress_env``), and the client's bytes skip the
    HTTP proxy actor. The variables are set in this process before Ray starts, so Ray's processes inherit them.

    ``throughput_optimized``: Ray Serve's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``): user code
    and the router on the replica's own event loop instead of threads of their own, gRPC between deployments, and
    direct ingress (so it implies ``direct_ingress``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import ray
        from ray import serve

        from tropical_sched.integrations.ray_serve import build_tropical_app, direct_ingress_env
    for name in direct_ingress_env(1, 2, throughput_optimized=True):  # a run before this one may have set them
        os.environ.pop(name, None)
    if direct_ingress or throughput_optimized:
        direct_port = free_port()
        os.environ.update(direct_ingress_env(direct_port, free_port(), throughput_optimized=throughput_optimized))
    else:
        direct_port = None
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_tropical_app(config, stats_period_s=stats_period_s), route_prefix="/")
    return f"http://127.0.0.1:{direct_port or port}"


def add_ray_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """``--direct-ingress`` and ``--throughput-optimized``, the Ray Serve modes :func:`start_ray_app` runs in."""
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Ray Serve's direct ingress (experimental in Ray 2.60): clients reach the ingress replica, not the proxy",
    )
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1; implies --direct-ingress)",
    )


def ray_modes(args: argparse.Namespace) -> dict[str, bool]:
    """The modes of :func:`add_ray_mode_arguments` as :func:`start_ray_app`'s keyword arguments, and as a run's JSON
    records them (the throughput-optimized mode runs with direct ingress)."""
    return {
        "direct_ingress": args.direct_ingress or args.throughput_optimized,
        "throughput_optimized": args.throughput_optimized,
    }


def _ray_app(engine_urls: list[str], stats_period_s: float, decision_log: Path | None = None, **modes: bool) -> str:
    config: dict[str, Any] = {
        "policy": "tropical",
        "profile": PROFILE,
        "model": "fake-model",
        "instances": [{"url": url, "role": role} for url, role in zip(engine_urls, ROLES, strict=True)],
    }
    if decision_log is not None:
        config["decision_log"] = str(decision_log)
    return start_ray_app(config, stats_period_s, **modes)


def ray_down() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _probe(url: str, count: int) -> float:
    """Median seconds of ``count`` sequential short streamed completions."""
    body = {"model": "fake-model", "prompt": [1] * 8, "max_tokens": 1, "stream": True}
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(count + 5):
            started = time.perf_counter()
            with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                for _ in response.iter_bytes():
                    pass
            times.append(time.perf_counter() - started)
    return statistics.median(times[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=7.0, help="mean request rate, req/s")
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--stats-period-ms", type=float, default=100.0, help="Ray Serve's routing-stats period")
    parser.add_argument("--probes", type=int, default=200, help="sequential requests per path for added latency")
    add_ray_mode_arguments(parser)
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args()
    modes = ray_modes(args)

    log_dir = Path(tempfile.mkdtemp(prefix="ray-serve-"))
    print(f"logs: {log_dir}")
    results: dict[str, list[dict[str, Any]]] = {"tropical serve": [], "ray serve": []}
    for seed in args.seeds:
        for label in results:
            engines, engine_urls = _engines(log_dir)
            routers: list[ServerProcess] = []
            # each front's routing decisions, per request (benchmarks/decision_log.py sums them up)
            decisions = log_dir / f"{label.replace(' ', '-')}-seed{seed}.decisions.jsonl"
            try:
                if label == "ray serve":
                    urls = [_ray_app(engine_urls, args.stats_period_ms / 1e3, decisions, **modes)]
                else:
                    routers, urls = _routers(1, engine_urls, 0.0, log_dir, decisions)
                figures = _replay(urls, args, seed, label, log_dir)
            finally:
                if label == "ray serve":
                    ray_down()
                for process in [*routers, *engines]:
                    process.stop()
            results[label].append({"seed": seed, **figures})
            print(
                f"seed {seed} {label:15s} joint {figures['slo_attainment']:6.1%}, multiplexed "
                f"{figures['num_multiplexed']}, cores busy {figures['cpu_busy_fraction']:.0%}",
                flush=True,
            )

    engines, engine_urls = _engines(log_dir)
    routers = []
    try:
        direct_s = _probe(engine_urls[1], args.probes)
        routers, router_urls = _routers(1, engine_urls, 0.0, log_dir)
        router_s = _probe(router_urls[0], args.probes)
        routers[0].stop()
        ray_s = _probe(_ray_app(engine_urls, args.stats_period_ms / 1e3, **modes), args.probes)
        ray_down()
    finally:
        for process in [*routers, *engines]:
            process.stop()
    latency = {
        "engine_alone_p50_ms": direct_s * 1e3,
        "tropical_serve_added_p50_ms": (router_s - direct_s) * 1e3,
        "ray_serve_added_p50_ms": (ray_s - direct_s) * 1e3,
    }
    machine = f"{os.cpu_count()} cores, shared by the replay client, Ray or the router, and the engines, unpinned"
    print(f"{TRACE}, {args.num_requests} requests at {args.rate:g} req/s; {machine}")
    for label, runs in results.items():
        print(f"{label:15s} mean joint SLO attainment {statistics.mean(r['slo_attainment'] for r in runs):6.1%}")
    print(
        f"added latency, P50 of {args.probes} sequential 1-token requests: tropical serve "
        f"{latency['tropical_serve_added_p50_ms']:.1f} ms, Ray Serve {latency['ray_serve_added_p50_ms']:.1f} ms"
    )
    if args.json:
        record = {
            **_record_header("ray_serve.py", args),
            "stats_period_s": args.stats_period_ms / 1e3,
            "num_probes": args.probes,
            "machine": machine,
            **modes,
            "ways": results,
            "latency": latency,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
