"""Sum up a router's decision log (``tropical serve --decision-log PATH``): per route, attainment, the wait at the
router, how far the measured TTFT and TPOT were from the policy's predictions, and where the requests' TPOT sat
against their TPOT SLO (deciles of TPOT / SLO: a scheduler that spends every decode's TPOT slack ends its requests
near 1.0, where a small over-run is a miss).

    python benchmarks/decision_log.py PATH [PATH ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from tropical_sched.serve.decision_log import read_decision_log, summarize_decision_log


def tpot_over_slo_deciles(entries: list[dict[str, Any]]) -> list[float]:
    """Deciles (10th to 90th percentile) of TPOT / TPOT SLO over the finished requests with more than one token."""
    ratios = [
        e["tpot_s"] / e["tpot_slo_s"]
        for e in entries
        if e["outcome"] == "ok" and e["tpot_s"] is not None and e.get("num_output_tokens", 0) > 1
    ]
    return statistics.quantiles(ratios, n=10) if len(ratios) >= 2 else []


PD_SEGMENTS = {
    "wait": ("arrival_at_s", "routed_at_s"),
    "prefill": ("routed_at_s", "prefill_done_at_s"),
    "back_and_placement": ("prefill_done_at_s", "decode_placed_at_s"),
    "hop_to_first_token": ("decode_placed_at_s", "first_token_at_s"),
}
"""Where a P/D request's TTFT goes: its wait at the router, its prefill (queue included) until the prefill's answer,
the answer's way back and the decode half's placement, and from there to the first token (the hop, the first
decode step, the relay)."""


def pd_segments(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and 90th percentile (seconds) of each of :data:`PD_SEGMENTS` over the P/D requests that got a first
    token; a segment whose ends a log does not have (an older log, a SGLang P/D request) is left out."""
    pd = [e for e in entries if e["route"] == "prefill" and e.get("first_token_at_s") is not None]
    segments = {}
    for name, (start, end) in PD_SEGMENTS.items():
        values = [e[end] - e[start] for e in pd if e.get(start) is not None and e.get(end) is not None]
        if len(values) >= 2:
            segments[name] = {"p50_s": statistics.median(values), "p90_s": statistics.quantiles(values, n=10)[8]}
    return segments


def summary(path: Path) -> dict[str, Any]:
    """One log's summary, JSON-ready (NaN as None)."""
    entries = read_decision_log(path)
    routes = {
        route or "unrouted": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in fields.items()}
        for route, fields in ((r, dataclasses.asdict(s)) for r, s in summarize_decision_log(entries).items())
    }
    deciles = tpot_over_slo_deciles(entries)
    ok = [e for e in entries if e["outcome"] == "ok" and e["tpot_s"] is not None and e.get("num_output_tokens", 0) > 1]
    near = sum(1 for e in ok if 0.9 < e["tpot_s"] / e["tpot_slo_s"] <= 1.0)
    over = sum(1 for e in ok if 1.0 < e["tpot_s"] / e["tpot_slo_s"] <= 1.1)
    return {
        "path": str(path),
        "num_requests": len(entries),
        "routes": routes,
        "tpot_over_slo_deciles": deciles,
        "num_tpot_within_10pct_below_slo": near,
        "num_tpot_within_10pct_over_slo": over,
        "pd_segments": pd_segments(entries),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    args = parser.parse_args()
    summaries = [summary(path) for path in args.paths]
    for s in summaries:
        print(f"{s['path']}: {s['num_requests']} requests")
        for route, r in s["routes"].items():
            ms = {key: "-" if r[key] is None else f"{r[key] * 1e3:.0f} ms" for key in r if key.endswith("_s")}
            print(
                f"  {route:10s} {r['num_requests']:4d} requests  SLO {r['slo_attainment']:.1%}  TTFT "
                f"{r['ttft_attainment']:.1%}  TPOT {r['tpot_attainment']:.1%}  wait p50 {ms['wait_p50_s']}  TTFT over "
                f"predicted p50 {ms['ttft_over_predicted_p50_s']}  TPOT over predicted p50 "
                f"{ms['tpot_over_predicted_p50_s']}"
            )
        deciles = " ".join(f"{d:.2f}" for d in s["tpot_over_slo_deciles"])
        print(f"  TPOT / SLO deciles: {deciles}")
        print(
            f"  TPOT within 10% below the SLO: {s['num_tpot_within_10pct_below_slo']}; within 10% over it: "
            f"{s['num_tpot_within_10pct_over_slo']}"
        )
        if s["pd_segments"]:
            parts = [f"{k} {v['p50_s'] * 1e3:.0f} / {v['p90_s'] * 1e3:.0f} ms" for k, v in s["pd_segments"].items()]
            print(f"  P/D TTFT by segment, p50 / p90: {'; '.join(parts)}")
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "logs": summaries}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
