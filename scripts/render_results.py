"""Render the docs' result tables from the committed JSON under ``benchmarks/results/``.

A generated section of a Markdown file sits between two markers::

    <!-- generated: NAME (scripts/render_results.py) -->
    ...
    <!-- end generated: NAME -->

and its text is what the renderer of ``NAME`` makes of its JSON file. ``python scripts/render_results.py``
rewrites every section; ``--check`` only reports the sections that disagree with their JSON (exit 1), which
``tests/test_repo.py`` runs so that the prose and the result files cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

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
    "tropical": "Tropical",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_real_engines(data: dict[str, Any]) -> str:
    """The real-engine comparison of docs/evaluation.md from ``benchmarks/results/real-engines/vllm-cpu.json``
    (issue 14's schema): every deployment at every load, measured, with the simulator's joint attainment beside it
    and the ranking both give."""
    lines = [
        f"Engine {data['engine']}; model {data['model']}; trace {data['trace']}; SLOs {data['slo']}. Cores: "
        f"{data['cores']}. Loads: the knee is the best stock policy's simulated goodput on the profile "
        f"({data['knee_per_s']:g} req/s), light half of it, overloaded 1.5x.",
        "",
        "| load | rate (req/s) | deployment | requests | joint attainment | TTFT att. | TPOT att. | TTFT P90 ms | "
        "TPOT P90 ms | simulated joint att. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted(data["loads"], key=lambda entry: _LOAD_ORDER.get(entry["name"], 9)):
        for key, figures in load["deployments"].items():
            name = _DEPLOYMENT_NAMES.get(key, key)
            if "shape" in figures:
                name += f" ({figures['shape']})"
            lines.append(
                f"| {load['name']} | {load['rate_per_s']:g} | {name} | {figures['num_requests']} | "
                f"{_pct(figures['slo_attainment'])} | {_pct(figures['ttft_attainment'])} | "
                f"{_pct(figures['tpot_attainment'])} | {_ms(figures['ttft_p90_s'])} | {_ms(figures['tpot_p90_s'])} | "
                f"{_pct(figures['simulated']['slo_attainment'])} |"
            )
    lines.append("")
    for load in sorted(data["loads"], key=lambda entry: _LOAD_ORDER.get(entry["name"], 9)):
        deployments = load["deployments"]
        if not deployments:
            continue
        measured = sorted(deployments, key=lambda k: -deployments[k]["slo_attainment"])
        simulated = sorted(deployments, key=lambda k: -deployments[k]["simulated"]["slo_attainment"])
        stock = [k for k in deployments if k != "tropical"]
        line = f"- {load['name']}: measured ranking {' > '.join(measured)}; simulated {' > '.join(simulated)}"
        if "tropical" in deployments and stock:
            best = max(stock, key=lambda k: deployments[k]["slo_attainment"])
            points = (deployments["tropical"]["slo_attainment"] - deployments[best]["slo_attainment"]) * 100
            line += f"; Tropical {points:+.1f} points against the best stock deployment ({best})"
        lines.append(line + ".")
    lines.append("")
    lines.append(
        f"Plan: `{data['plan']['command']}` recommended {data['plan']['recommendation']['policy']} at "
        f"{data['plan']['recommendation']['shape']}; Tropical ran at {data['plan']['tropical_shape']}."
    )
    diagnosis = data.get("diagnosis") or []
    if diagnosis:
        lines += [
            "",
            f"Diagnosis runs (at the knee, {data['loads'][1]['rate_per_s']:g} req/s, unless marked) and what "
            "vLLM's own metrics say per engine "
            "(engine 0 on core 0 beside the client and any proxy, engine 1 alone on core 1): mean inter-token "
            "latency, steps run, mean prefill time (scheduled to first token), tokens generated.",
            "",
            "| run | joint | TTFT att. | TPOT att. | engine 0: ITL ms / steps / prefill ms / tokens | "
            "engine 1: ITL ms / steps / prefill ms / tokens |",
            "|---|---|---|---|---|---|",
        ]
        for run in diagnosis:
            cells = [
                f"{e['itl_mean_s'] * 1e3:.1f} / {e['num_steps']:,.0f} / {e['prefill_mean_s'] * 1e3:,.0f} / "
                f"{e['num_generation_tokens']:,.0f}"
                for e in run["engines"]
            ] or ["-", "-"]
            lines.append(
                f"| {run['what']} | {_pct(run['slo_attainment'])} | {_pct(run['ttft_attainment'])} | "
                f"{_pct(run['tpot_attainment'])} | {' | '.join(cells)} |"
            )
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


RENDERERS: dict[str, tuple[Path, Callable[[dict[str, Any]], str]]] = {
    "fidelity": (RESULTS / "fidelity.json", render_fidelity),
    "real-engines-vllm-cpu": (RESULTS / "real-engines" / "vllm-cpu.json", render_real_engines),
    "plan-cpu-served-llama": (RESULTS / "real-engines" / "plan-cpu-served-llama.json", render_plan),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report sections that disagree with their JSON")
    parser.add_argument("files", nargs="*", type=Path, default=sorted((ROOT / "docs").glob("*.md")))
    args = parser.parse_args(argv)
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
