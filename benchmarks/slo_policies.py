"""Goodput of all seven policies on the evaluation's traces, with uniform SLOs and with a mix of SLO classes.

Settings: the evaluation's three traces (see ``reproduce_paper.py``) on 2 x Llama-2-70B TP4 A100 (8 GPUs) with the
paper's SLOs (TTFT 5x isolated prefill, TPOT 100 ms), and the Azure and Mooncake traces again with SCORPIO-style
heterogeneous SLOs (``scorpio6``: six equally likely classes, TTFT 0.5x/2x x TPOT 0.75x/1.5x/3x of those), the
workload the SLO-aware colocated schedulers were designed for. For each setting: goodput at 90% joint SLO
attainment (mean and spread over seeds), and for the mixed settings the attainment per SLO class of every
policy at the rate where the best policy sits at its goodput.

``--json`` writes every figure (``schema_version`` 1, with the command line, the parameters and the wall time):
``benchmarks/results/slo-policies.json`` is the committed run that ``scripts/render_results.py`` renders into
docs/evaluation.md.

Usage: python benchmarks/slo_policies.py [--num-requests 2000] [--seeds 0,1,2] [--jobs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from reproduce_paper import SETTINGS

from tropical_sched import load_profile, policy_names
from tropical_sched.core.slo import SLO_CLASS_PRESETS, SloSpec
from tropical_sched.metrics.attainment import summarize_by_class
from tropical_sched.sim.experiment import Experiment
from tropical_sched.sim.goodput import evaluate_point, run_goodput
from tropical_sched.sim.simulator import simulate

MIXED = ("azure", "mooncake")
MECHANISMS = (("scorpio", "credit_batching"), ("tempo", "pacing"))
"""The mechanisms measured on and off on the Azure mix (one run each): SCORPIO's credit-based batching, Tempo's
pacing."""
MECHANISM_RATE_PER_S = 2.5
MECHANISM_NUM_REQUESTS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=2000, help="requests per simulated point")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write every figure as JSON")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    policies = tuple(policy_names())
    started = time.time()
    mixed_slo = SloSpec.make(classes=SLO_CLASS_PRESETS["scorpio6"])
    runs: list[tuple[str, Experiment]] = []
    for setting in SETTINGS:
        base = Experiment(
            trace=setting.trace,
            num_workers=2,
            overlength=setting.overlength,
            arrival_process=setting.arrival,
            num_requests=args.num_requests,
            policies=policies,
        )
        runs.append((f"{setting.key}, uniform SLOs", base))
    for setting in SETTINGS:
        if setting.key in MIXED:
            base = next(e for label, e in runs if label.startswith(setting.key))
            runs.append((f"{setting.key}, scorpio6 SLO mix", dataclasses.replace(base, slo=mixed_slo)))

    out: dict[str, Any] = {
        "schema_version": 1,
        "command": "python benchmarks/slo_policies.py " + " ".join(sys.argv[1:]),
        "num_requests_per_point": args.num_requests,
        "seeds": list(seeds),
        "jobs": args.jobs,
        "machine": f"{os.cpu_count()} cores",
        "profile": runs[0][1].profile,
        "num_workers": runs[0][1].num_workers,
        "policies": list(policies),
        "slo_mix": {"name": "scorpio6", "classes": [c.name for c in mixed_slo.classes]},
        "settings": [],
    }
    lines = ["| setting | " + " | ".join(policies) + " | best |", "|---" * (len(policies) + 2) + "|"]
    class_lines: list[str] = []
    for label, experiment in runs:
        tick = time.time()
        result = run_goodput(experiment, seeds=seeds, jobs=args.jobs)
        goodput = {name: result.goodput_per_s(name) for name in policies}
        best = max(goodput, key=goodput.__getitem__)
        cells = []
        for name in policies:
            low, high = result.spread_per_s(name)
            text = f"{goodput[name]:.2f} ({low:.2f}-{high:.2f})"
            cells.append(f"**{text}**" if name == best else text)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best} |")
        entry: dict[str, Any] = {
            "label": label,
            "key": label.split(",")[0],
            "trace": experiment.trace,
            "slo_mix": "scorpio6" if experiment.slo.classes else None,
            "goodput": result.to_json(),
            "best_policy": best,
        }
        if experiment.slo.classes:
            rate = goodput[best]
            class_lines += _class_rows(label, experiment, rate, policies, entry)
        entry["wall_s"] = round(time.time() - tick, 1)
        out["settings"].append(entry)
        print(f"  {label}: {time.time() - tick:.0f} s", flush=True)

    azure_mix = next(e for label, e in runs if label == "azure, scorpio6 SLO mix")
    mechanisms = []
    for policy, option in MECHANISMS:
        attainment = {}
        for enabled in (True, False):
            experiment = dataclasses.replace(
                azure_mix,
                num_requests=MECHANISM_NUM_REQUESTS,
                policies=(policy,),
                policy_options={} if enabled else {policy: {option: False}},
            )
            point = evaluate_point(experiment, policy, 0, rate_per_s=MECHANISM_RATE_PER_S)
            attainment["on" if enabled else "off"] = point.slo_attainment
        mechanisms.append({"policy": policy, "option": option, "slo_attainment": attainment})
        print(f"  {policy} {option}: on {attainment['on']:.1%}, off {attainment['off']:.1%}", flush=True)
    out["mechanisms"] = {
        "setting": "azure, scorpio6 SLO mix",
        "rate_per_s": MECHANISM_RATE_PER_S,
        "num_requests": MECHANISM_NUM_REQUESTS,
        "seed": 0,
        "runs": mechanisms,
    }

    print(f"\n## Goodput at 90% joint SLO attainment, 2 x A100 Llama-2-70B TP4 (req/s; mean over seeds {args.seeds})\n")
    print("\n".join(lines))
    if class_lines:
        print("\n## Joint SLO attainment per SLO class at the best policy's goodput (seed 0)\n")
        print("| setting, rate | class | " + " | ".join(policies) + " |")
        print("|---" * (len(policies) + 2) + "|")
        print("\n".join(class_lines))
    out["wall_s"] = round(time.time() - started, 1)
    print(f"\ntotal {out['wall_s']:.0f} s wall-clock")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


def _class_rows(
    label: str, experiment: Experiment, rate_per_s: float, policies: tuple[str, ...], entry: dict[str, Any]
) -> list[str]:
    point = dataclasses.replace(experiment, rate_per_s=rate_per_s)
    profile = load_profile(point.profile)
    workload = point.make_workload(profile)
    by_policy = {
        name: summarize_by_class(simulate(workload, profile, name, cluster=point.cluster, slo=point.slo).records)
        for name in policies
    }
    entry["by_slo_class_at_rate"] = {
        "rate_per_s": rate_per_s,
        "seed": point.seed,
        "policies": {n: {c: s.slo_attainment for c, s in by.items()} for n, by in by_policy.items()},
    }
    rows = []
    for slo_class in point.slo.classes:
        cells = [f"{by_policy[n][slo_class.name].slo_attainment:.0%}" for n in policies]
        rows.append(f"| {label} @ {rate_per_s:.2f} | {slo_class.name} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
