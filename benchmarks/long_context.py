"""Long-context profiles from AIConfigurator, checked against measurements, and the paper's regime unclipped.

Three parts, all written to one JSON file (default ``benchmarks/results/long-context.json``) that
``scripts/render_results.py`` renders into docs/evaluation.md:

* ``profiles``: every bundled AIConfigurator profile imported again (``import_aiconfigurator``, the code behind
  ``tropical-profile import aiconfigurator``): import time, and the fit's median and max relative error against
  the estimator's own samples, overall and by context band (up to 4K, 4K-32K, beyond 32K tokens).
* ``cross_check``: AIConfigurator's Llama-3.1-70B TP4 A100 estimates (vLLM 0.14 tables) against splitwise-sim's
  measured Llama-2-70B TP4 A100 steps (the bundled ``a100-llama2-70b-tp4``; the layer shapes are the same, the
  vocabulary differs: 128K against 32K tokens), step by step; then every policy's goodput on both profiles, with the
  AIConfigurator one cut to Llama-2's 4,096-token context so that both serve the same clipped workloads, and
  whether the policies rank the same way.
* ``settings``: the paper's comparison (goodput at 90% joint SLO attainment, TTFT 5x isolated prefill, TPOT
  100 ms, all seven policies, 2 workers) on Llama-3.1-70B TP4, H100 and H200, on the Mooncake conversation trace
  and the arXiv-summarization lengths, Poisson arrivals, nothing filtered or clipped (each setting's
  ``workload_report`` says so).

Needs ``aiconfigurator-core`` (``pip install '.[aiconfigurator]'``). Usage:

    python benchmarks/long_context.py [--num-requests 2000] [--seeds 0,1,2] [--jobs 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from tropical_sched.policies.registry import policy_names
from tropical_sched.predictors.profile import load_profile, write_profile_file
from tropical_sched.profiling.aiconfigurator import fit_error_by_context_band, import_aiconfigurator
from tropical_sched.sim.experiment import Experiment
from tropical_sched.sim.goodput import GoodputResult, run_goodput

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from build_bundled_data import AICONFIGURATOR_PROFILES  # noqa: E402  (the bundled list, one definition)

MEASURED = "a100-llama2-70b-tp4"
CROSS_CHECK = ("meta-llama/Meta-Llama-3.1-70B", "a100_sxm", "vllm", 4)
CROSS_CHECK_SETTINGS = (
    # (key, trace, overlength, arrival): the clipped regime of docs/evaluation.md's paper comparison
    ("mooncake-clipped", "mooncake-conversation", "clip", "poisson"),
    ("arxiv", "arxiv-summarization", "filter", "poisson"),
    ("azure", "azure-conv-2023", "filter", None),
)
LONG_PROFILES = ("h100-llama3.1-70b-tp4", "h200-llama3.1-70b-tp4")
LONG_SETTINGS = (
    ("mooncake", "mooncake-conversation", "Mooncake conversation lengths, Poisson arrivals, unclipped"),
    ("arxiv", "arxiv-summarization", "arXiv summarization lengths (LongBench stand-in), Poisson arrivals"),
)


def _profiles_part() -> list[dict[str, Any]]:
    out = []
    for model, system, backend, tp in AICONFIGURATOR_PROFILES:
        started_s = time.perf_counter()
        profile = import_aiconfigurator(model, system=system, backend=backend, tensor_parallel_size=tp)
        import_s = time.perf_counter() - started_s
        bundled = load_profile(profile.metadata.name).file
        out.append(
            {
                "name": profile.metadata.name,
                "model": model,
                "system": system,
                "backend": backend,
                "backend_version": profile.metadata.environment["backend_version"],
                "tensor_parallel_size": tp,
                "max_model_len": profile.metadata.model.max_model_len,
                "num_kv_cache_tokens": profile.kv_cache.num_tokens,
                "import_s": import_s,
                "num_samples": len(profile.samples),
                "r2": profile.fit.r2,
                "median_relative_error": profile.fit.median_relative_error,
                "max_relative_error": profile.fit.max_relative_error,
                "same_as_bundled": bundled.fit.coefficients == profile.fit.coefficients,
                "bands": [
                    {
                        "lower_tokens": band.lower_tokens,
                        "upper_tokens": min(band.upper_tokens, profile.metadata.model.max_model_len),
                        "num_samples": band.num_samples,
                        "median_relative_error": band.median_relative_error,
                        "max_relative_error": band.max_relative_error,
                    }
                    for band in fit_error_by_context_band(profile)
                ],
            }
        )
        print(f"  {out[-1]['name']}: imported in {import_s:.1f} s, R^2 {profile.fit.r2:.4f}", flush=True)
    return out


def _step_rows() -> list[dict[str, Any]]:
    """Every fitted splitwise-sim step beside AIConfigurator's estimate of the same step."""
    from aiconfigurator_core.sdk.engine import EngineHandle

    from tropical_sched.profiling.aiconfigurator import _quiet

    model, system, backend, tp = CROSS_CHECK
    with _quiet():
        engine = EngineHandle.compile(model, system, backend, tp_size=tp)
    measured: dict[tuple[str, int, int], list[float]] = {}
    for sample in load_profile(MEASURED).file.samples:
        if not sample.used_in_fit:
            continue
        if sample.prefill_chunks:
            ((_, tokens),) = sample.prefill_chunks
            key = ("prefill", 1, tokens)
        else:
            key = ("decode", sample.num_decode_seqs, round(sample.num_decode_context_tokens / sample.num_decode_seqs))
        measured.setdefault(key, []).append(sample.step_time_s)
    rows = []
    with _quiet():
        for (kind, batch, tokens), times in sorted(measured.items()):
            if kind == "prefill":
                estimate_ms = engine.predict_prefill_latency(1, tokens, 0)
            else:
                estimate_ms = engine.decode_step_latency(batch, tokens - 2, 2)  # attends to isl + osl // 2 + 1
            measured_s = statistics.median(times)
            rows.append(
                {
                    "kind": kind,
                    "batch_size": batch,
                    "num_tokens": tokens,
                    "measured_s": measured_s,
                    "aiconfigurator_s": estimate_ms / 1e3,
                    "relative_difference": estimate_ms / 1e3 / measured_s - 1,
                }
            )
    return rows


def _ranking(result: GoodputResult) -> list[str]:
    return sorted(result.runs, key=lambda name: -result.goodput_per_s(name))


def _cross_check_part(seeds: tuple[int, ...], num_requests: int, jobs: int) -> dict[str, Any]:
    model, system, backend, tp = CROSS_CHECK
    rows = _step_rows()
    rankings = []
    with tempfile.TemporaryDirectory() as scratch:
        cut = import_aiconfigurator(
            model, system=system, backend=backend, tensor_parallel_size=tp, max_model_len=4096, name="aic-4k"
        )
        cut_path = Path(scratch) / "a100-llama3.1-70b-tp4-4k.json"
        write_profile_file(cut, cut_path)
        for key, trace, overlength, arrival in CROSS_CHECK_SETTINGS:
            results = {}
            for label, profile in (("measured", MEASURED), ("aiconfigurator", str(cut_path))):
                experiment = Experiment(
                    trace=trace,
                    profile=profile,
                    num_workers=2,
                    overlength=overlength,
                    arrival_process=arrival,
                    num_requests=num_requests,
                    policies=tuple(policy_names()),
                )
                tick = time.time()
                results[label] = run_goodput(experiment, seeds=seeds, jobs=jobs)
                print(f"  cross-check {key} on {label}: {time.time() - tick:.0f} s", flush=True)
            measured, estimated = results["measured"], results["aiconfigurator"]
            rankings.append(
                {
                    "key": key,
                    "trace": trace,
                    "overlength": overlength,
                    "goodput_per_s_measured": {n: measured.goodput_per_s(n) for n in measured.runs},
                    "goodput_per_s_aiconfigurator": {n: estimated.goodput_per_s(n) for n in estimated.runs},
                    "ranking_measured": _ranking(measured),
                    "ranking_aiconfigurator": _ranking(estimated),
                }
            )
    return {
        "measured_profile": MEASURED,
        "aiconfigurator": {"model": model, "system": system, "backend": backend, "tensor_parallel_size": tp},
        "steps": rows,
        "rankings": rankings,
    }


def _settings_part(seeds: tuple[int, ...], num_requests: int, jobs: int) -> list[dict[str, Any]]:
    out = []
    for profile in LONG_PROFILES:
        for key, trace, description in LONG_SETTINGS:
            experiment = Experiment(
                trace=trace,
                profile=profile,
                num_workers=2,
                overlength="filter",
                arrival_process="poisson",
                num_requests=num_requests,
                policies=tuple(policy_names()),
            )
            tick = time.time()
            result = run_goodput(experiment, seeds=seeds, jobs=jobs)
            others = {n: result.goodput_per_s(n) for n in result.runs if n != "tropical"}
            best = max(others, key=lambda n: others[n])
            gpu = profile.split("-")[0].upper()
            out.append(
                {
                    "key": key,
                    "label": f"{key}, 2 x {gpu} TP4",
                    "description": description,
                    "trace": trace,
                    "profile": profile,
                    "num_workers": 2,
                    "best_other_policy": best,
                    "tropical_to_best_other": result.goodput_per_s("tropical") / others[best]
                    if others[best] > 0
                    else None,
                    "goodput": result.to_json(),
                }
            )
            print(f"  {out[-1]['label']}: {time.time() - tick:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=2000, help="requests per simulated point")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", default=str(RESULTS / "long-context.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # profile-range notes
    seeds = tuple(int(s) for s in args.seeds.split(","))
    from importlib import metadata

    started = time.time()
    out: dict[str, Any] = {
        "schema_version": 1,
        "command": "python benchmarks/long_context.py " + " ".join(sys.argv[1:]),
        "aiconfigurator_core": metadata.version("aiconfigurator-core"),
        "num_requests_per_point": args.num_requests,
        "seeds": list(seeds),
        "policies": list(policy_names()),
        "target_attainment": 0.9,
    }
    print("profiles", flush=True)
    out["profiles"] = _profiles_part()
    print("cross-check", flush=True)
    out["cross_check"] = _cross_check_part(seeds, args.num_requests, args.jobs)
    print("long-context settings", flush=True)
    out["settings"] = _settings_part(seeds, args.num_requests, args.jobs)
    out["wall_s"] = time.time() - started
    import json

    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
