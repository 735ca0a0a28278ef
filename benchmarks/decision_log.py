"""Sum up a router's decision log (``tropical serve --decision-log PATH``): per route, attainment, the wait at the
router, how far the measured TTFT and TPOT were from the policy's predictions, and where the requests' TPOT sat
against their TPOT SLO (deciles of TPOT / SLO: a scheduler that spends every decode's TPOT slack ends its requests
near 1.0, where a small over-run is a miss). With ``--replay``, each log beside the client's records of the same
run (``tropical replay`` / ``validate --json``): how much later the client saw each first token than the router
did (the front's path between them: Ray Serve's HTTP proxy, for instance), and how many requests met their SLOs
at the router and missed them at the client.

    python benchmarks/decision_log.py PATH [PATH ...] [--replay REPLAY.json ...] [--json OUT]
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


def client_over_router(entries: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The client's view of a run against its router's: each client record is matched to the log entry of the
    same prompt length whose arrival, counted from the run's first, is nearest (the two sides name requests
    differently); over the matched requests that both saw finish, the client's TTFT less the router's (median and
    90th percentile, seconds), and the number that met both SLOs by the router's measure and not by the client's.

    Raises:
        ValueError: no request could be matched.
    """
    finished = [e for e in entries if e["outcome"] == "ok" and e.get("ttft_s") is not None]
    if not finished or not records:
        raise ValueError("client_over_router: nothing to match (an empty log or replay)")
    log_start_s = min(e["arrival_at_s"] for e in entries)
    client_start_s = min(r["arrival_at_s"] for r in records)
    by_length: dict[int, list[dict[str, Any]]] = {}
    for entry in finished:
        by_length.setdefault(entry["num_prompt_tokens"], []).append(entry)
    gaps_s: list[float] = []
    num_lost = 0
    for record in sorted(records, key=lambda r: r["arrival_at_s"]):
        if record.get("failed") or record.get("ttft_s") is None:
            continue
        candidates = by_length.get(record["num_prompt_tokens"])
        if not candidates:
            continue
        offset_s = record["arrival_at_s"] - client_start_s
        entry = min(candidates, key=lambda e: abs(e["arrival_at_s"] - log_start_s - offset_s))
        candidates.remove(entry)
        gaps_s.append(record["ttft_s"] - entry["ttft_s"])
        met_at_router = entry["ttft_s"] <= entry["ttft_slo_s"] and (entry["tpot_s"] or 0.0) <= entry["tpot_slo_s"]
        met_at_client = record["ttft_s"] <= record["ttft_slo_s"] and (record["tpot_s"] or 0.0) <= record["tpot_slo_s"]
        num_lost += met_at_router and not met_at_client
    if len(gaps_s) < 2:
        raise ValueError(f"client_over_router: only {len(gaps_s)} request(s) matched")
    return {
        "num_matched": len(gaps_s),
        "ttft_p50_s": statistics.median(gaps_s),
        "ttft_p90_s": statistics.quantiles(gaps_s, n=10)[8],
        "num_met_at_router_missed_at_client": num_lost,
    }


def summary(path: Path, replay: Path | None = None) -> dict[str, Any]:
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
        **(
            {"replay": str(replay), "client_over_router": client_over_router(entries, _records(replay))}
            if replay is not None
            else {}
        ),
    }


def _records(replay: Path) -> list[dict[str, Any]]:
    """The per-request records of a ``tropical replay`` or ``tropical validate --json`` result."""
    data = json.loads(replay.read_text())
    records = data.get("records") or (data.get("measured") or {}).get("records")
    if not records:
        raise SystemExit(f"{replay}: no per-request records")
    return list(records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument(
        "--replay", type=Path, nargs="+", help="the client's records of each log's run, in the order of the logs"
    )
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    args = parser.parse_args()
    if args.replay is not None and len(args.replay) != len(args.paths):
        parser.error(f"--replay: {len(args.replay)} file(s) for {len(args.paths)} log(s); give one per log")
    replays = args.replay or [None] * len(args.paths)
    summaries = [summary(path, replay) for path, replay in zip(args.paths, replays, strict=True)]
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
        if "client_over_router" in s:
            gap = s["client_over_router"]
            print(
                f"  client's TTFT over the router's, p50 / p90: {gap['ttft_p50_s'] * 1e3:.0f} / "
                f"{gap['ttft_p90_s'] * 1e3:.0f} ms ({gap['num_matched']} requests); met the SLOs at the router, "
                f"missed them at the client: {gap['num_met_at_router_missed_at_client']}"
            )
    if args.json:
        args.json.write_text(json.dumps({"schema_version": 1, "logs": summaries}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
