"""Collect the paired measurements of issue 14 into ``benchmarks/results/real-engines/paired-ab.json`` (rendered in
docs/evaluation.md, "Paired measurements"):

* the engine A/Bs (``benchmarks/engine_ab.py``: two single engines at once, then swapped) and the deployment A/Bs
  (``benchmarks/deployment_ab.py``: both deployments at once on shared cores), from
  ``benchmarks/results/real-engines/paired/``;
* the knee runs of ``benchmarks/real_engines.py`` that keep every request (``tropical validate --json`` does
  since stop 29), split into windows of arrival time: how many requests of each window met both SLOs under round
  robin and under Tropical, the same requests at the same offsets in runs a few minutes apart.

    python benchmarks/paired_ab.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from real_engines import HERE, RAW
from real_engines import OUT as REAL

PAIRED = REAL / "paired"
OUT = REAL / "paired-ab.json"
WINDOW_S = 20.0
DEPLOYMENTS = ("vllm-round-robin", "tropical")


def met_both(record: dict[str, Any]) -> bool:
    """Whether a request of a replay's ``records`` met its TTFT and TPOT SLOs (a failed one met neither)."""
    return (
        not record["failed"] and record["ttft_s"] <= record["ttft_slo_s"] and (record["tpot_s"] <= record["tpot_slo_s"])
    )


def knee_pairs(raw: Path = RAW) -> list[str]:
    """The ``runN`` variants of the knee with both deployments' runs keeping their requests, in order of N."""
    found = []
    for path in raw.glob("tropical-knee-run*.json"):
        match = re.fullmatch(r"tropical-knee-(run\d+)\.json", path.name)
        if match is None:
            continue
        variant = match.group(1)
        paths = [raw / f"{d}-knee-{variant}.json" for d in DEPLOYMENTS]
        if all(p.exists() and "records" in json.loads(p.read_text()) for p in paths):
            found.append(variant)
    return sorted(found, key=lambda v: int(v[3:]))


def windows(variant: str, raw: Path = RAW, window_s: float = WINDOW_S) -> dict[str, Any]:
    """One knee pair split by arrival time into windows of ``window_s``: requests per window, and per deployment
    those that met both SLOs."""
    records = {d: json.loads((raw / f"{d}-knee-{variant}.json").read_text())["records"] for d in DEPLOYMENTS}
    by_id = {d: {r["request_id"]: r for r in rs} for d, rs in records.items()}
    reference = records[DEPLOYMENTS[0]]
    count = int(max(r["arrival_at_s"] for r in reference) // window_s) + 1
    rows = [{"start_s": i * window_s, "num_requests": 0, "met": dict.fromkeys(DEPLOYMENTS, 0)} for i in range(count)]
    for record in reference:  # the same requests, sent at the same offsets: window by round robin's send times
        row = rows[int(record["arrival_at_s"] // window_s)]
        row["num_requests"] += 1
        for d in DEPLOYMENTS:
            row["met"][d] += met_both(by_id[d][record["request_id"]])
    return {
        "variant": variant,
        "slo_attainment": {d: sum(map(met_both, rs)) / len(rs) for d, rs in records.items()},
        "windows": rows,
    }


def same_router_pairs(diagnosis: Path = RAW / "diagnosis") -> list[dict[str, Any]]:
    """Tropical and the stock engines behind the same router (``tropical serve`` with ``vllm-chunked``), run one
    after the other at the knee (``real_engines.py measure --variant s29-same-router-N``): both deployments'
    figures per pair, in order of N."""
    pairs = []
    for path in sorted(
        diagnosis.glob("tropical-knee-s29-same-router-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1])
    ):
        n = path.stem.rsplit("-", 1)[1]
        other = diagnosis / f"vllm-colocated-router-knee-s29-same-router-{n}.json"
        if not other.exists():
            continue
        figures = {
            name: {
                k: json.loads(p.read_text())["measured"][k]
                for k in ("slo_attainment", "ttft_attainment", "tpot_attainment")
            }
            for name, p in (("tropical", path), ("stock-behind-router", other))
        }
        pairs.append({"pair": int(n), **figures})
    return pairs


def collect() -> dict[str, Any]:
    """The paired results, JSON-ready."""
    engine_pairs, deployment_pairs = [], []
    for path in sorted(PAIRED.glob("*.json")):
        data = json.loads(path.read_text())
        entry = {"file": str(path.relative_to(HERE.parent)), **data}
        (deployment_pairs if "deployments" in data else engine_pairs).append(entry)
    return {
        "schema_version": 1,
        "command": "python benchmarks/paired_ab.py",
        "engine_pairs": engine_pairs,
        "deployment_pairs": deployment_pairs,
        "window_s": WINDOW_S,
        "knee_pairs": [windows(variant) for variant in knee_pairs()],
        "same_router_pairs": same_router_pairs(),
    }


def main() -> int:
    data = collect()
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"wrote {OUT}: {len(data['engine_pairs'])} engine pairs, {len(data['deployment_pairs'])} deployment pairs, "
        f"knee pairs {', '.join(p['variant'] for p in data['knee_pairs'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
