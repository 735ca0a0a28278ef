"""How long ``tropical plan`` takes (issue 14: 4 instances, 7 policies, 2 seeds under 60 s on this machine).

Runs the command as a user would (a fresh process, the defaults: the Azure conversation trace, Llama-2-70B TP4 on
A100, every registered policy, seeds 0 and 1, 400 requests per point, one worker process per core) ``--repeats``
times, prints each wall-clock time and writes ``benchmarks/results/plan-speed.json``.

    python benchmarks/plan_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "plan-speed.json"
ARGV = ["plan", "--instances", "4", "--no-progress"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(RESULT))
    args = parser.parse_args()
    times_s = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "tropical_sched.cli.main", *ARGV, "--json", str(out)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            times_s.append(time.perf_counter() - started)
            print(f"tropical {' '.join(ARGV)}: {times_s[-1]:.1f} s", flush=True)
        plan = json.loads(out.read_text())
    data = {
        "schema_version": 1,
        "command": "tropical " + " ".join(ARGV),
        "machine": f"{os.cpu_count()} cores",
        "num_candidates": len(plan["candidates"]),
        "num_searches": len(plan["candidates"]) * len(plan["seeds"]),
        "num_requests_per_point": plan["num_requests_per_point"],
        "wall_s": times_s,
        "median_wall_s": statistics.median(times_s),
        "recommendation": {k: plan["recommendation"][k] for k in ("policy", "shape", "goodput_per_s")},
    }
    Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    print(
        f"median {data['median_wall_s']:.1f} s over {args.repeats} runs ({data['num_searches']} searches); "
        f"wrote {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
