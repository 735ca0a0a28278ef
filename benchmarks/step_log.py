"""An engine's step log set against a profile's step-time predictions: where the engine's time went.

Reads the logs the Tropical vLLM scheduler class writes with ``$TROPICAL_STEP_LOG`` set (one JSON object per step:
``started_at_s``, ``duration_s``, ``num_decode_seqs``, ``num_decode_context_tokens``, ``prefill_chunks``,
``prefill_token_cap``, and from stop 34 ``predicted_s``: what the engine side predicts for the step with the model
it holds as the step's output returns, calibrated online; see :mod:`tropical_sched.adapters.vllm.scheduler`) and
prints, per log (one engine core): its steps, the time they took and how much of the run that was (busy fraction),
the decode batch weighted by decode tokens, and per kind of step (decode only, mixed: decodes and prefill chunks,
prefill only) the count, the time, the mean step, the median of measured over predicted (the profile's
:meth:`~tropical_sched.predictors.step_time.StepTimeModel.step_time_s`), the median of measured over the engine's
own prediction (where the log has it), the median prefill tokens per step, and the prefill caps the steps ran
under.

Usage: python benchmarks/step_log.py LOG.jsonl [LOG.jsonl ...] [--profile cpu-served-llama] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from tropical_sched.core.errors import DataFormatError
from tropical_sched.predictors import StepTimeModel, load_profile

KINDS = ("decode", "mixed", "prefill")
FIELDS = ("started_at_s", "duration_s", "num_decode_seqs", "num_decode_context_tokens", "prefill_chunks")


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The steps of a log, in order.

    Raises:
        DataFormatError: a line is not a JSON object with the step fields (names the path and the line).
    """
    steps = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            try:
                step = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(str(path), number, f"not JSON: {exc.msg}") from None
            missing = [name for name in FIELDS if not isinstance(step, dict) or name not in step]
            if missing:
                raise DataFormatError(str(path), number, f"a step needs the fields {missing}")
            steps.append(step)
    return steps


def _kind(step: dict[str, Any]) -> str:
    if not step["prefill_chunks"]:
        return "decode"
    return "mixed" if step["num_decode_seqs"] else "prefill"


def summarize(steps: list[dict[str, Any]], model: StepTimeModel) -> dict[str, Any]:
    """Figures of one engine's steps (see the module's docstring); ``steps`` non-empty."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extrapolated contexts: the ratio says how far off it is there
        predicted = [
            model.step_time_s(
                num_decode_seqs=s["num_decode_seqs"],
                num_decode_context_tokens=s["num_decode_context_tokens"],
                prefill_chunks=tuple((int(p), int(c)) for p, c in s["prefill_chunks"]),
            )
            for s in steps
        ]
    span_s = steps[-1]["started_at_s"] + steps[-1]["duration_s"] - steps[0]["started_at_s"]
    busy_s = sum(s["duration_s"] for s in steps)
    decode_tokens = sum(s["num_decode_seqs"] for s in steps)
    summary: dict[str, Any] = {
        "num_steps": len(steps),
        "span_s": span_s,
        "busy_s": busy_s,
        "busy_fraction": busy_s / span_s if span_s > 0 else 1.0,
        "decode_batch_token_weighted": (
            sum(s["num_decode_seqs"] ** 2 for s in steps) / decode_tokens if decode_tokens else 0.0
        ),
        "num_prefill_tokens": sum(c for s in steps for _, c in s["prefill_chunks"]),
        "kinds": {},
    }
    for kind in KINDS:
        chosen = [(s, p) for s, p in zip(steps, predicted, strict=True) if _kind(s) == kind]
        if not chosen:
            continue
        caps = [s["prefill_token_cap"] for s, _ in chosen if s.get("prefill_token_cap") is not None]
        engine_ratios = [s["duration_s"] / s["predicted_s"] for s, _ in chosen if (s.get("predicted_s") or 0) > 0]
        summary["kinds"][kind] = {
            "num_steps": len(chosen),
            "time_s": sum(s["duration_s"] for s, _ in chosen),
            "mean_step_s": statistics.mean(s["duration_s"] for s, _ in chosen),
            "measured_over_predicted_p50": statistics.median(s["duration_s"] / p for s, p in chosen if p > 0),
            "measured_over_engine_predicted_p50": statistics.median(engine_ratios) if engine_ratios else None,
            "mean_decode_seqs": statistics.mean(s["num_decode_seqs"] for s, _ in chosen),
            "prefill_tokens_per_step_p50": statistics.median(sum(c for _, c in s["prefill_chunks"]) for s, _ in chosen),
            "num_capped_steps": len(caps),
            "prefill_token_cap_p50": statistics.median(caps) if caps else None,
        }
    return summary


def _print(name: str, summary: dict[str, Any]) -> None:
    print(
        f"{name}: {summary['num_steps']} steps over {summary['span_s']:.1f} s, busy {summary['busy_s']:.1f} s "
        f"({summary['busy_fraction']:.0%}); decode batch {summary['decode_batch_token_weighted']:.2f} "
        f"(weighted by decode tokens); {summary['num_prefill_tokens']} prefill tokens"
    )
    for kind, figures in summary["kinds"].items():
        cap = figures["prefill_token_cap_p50"]
        engine_ratio = figures.get("measured_over_engine_predicted_p50")
        print(
            f"  {kind:8s} {figures['num_steps']:6d} steps {figures['time_s']:7.1f} s  mean "
            f"{figures['mean_step_s'] * 1e3:6.1f} ms  measured/predicted {figures['measured_over_predicted_p50']:.2f}  "
            + (f"measured/engine's prediction {engine_ratio:.2f}  " if engine_ratio is not None else "")
            + f"decodes {figures['mean_decode_seqs']:4.1f}  "
            f"prefill tokens/step {figures['prefill_tokens_per_step_p50']:.0f}"
            + (f"  cap p50 {cap:.0f} ({figures['num_capped_steps']} capped)" if cap is not None else "")
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path, help="step logs (<prefix>.<pid>.jsonl)")
    parser.add_argument("--profile", default="cpu-served-llama", help="the profile to predict the steps with")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    model = load_profile(args.profile).step_time
    record: dict[str, Any] = {"schema_version": 1, "profile": args.profile, "engines": {}}
    for path in args.logs:
        steps = read_steps(path)
        if not steps:
            print(f"{path}: no steps", file=sys.stderr)
            continue
        summary = summarize(steps, model)
        _print(str(path), summary)
        record["engines"][path.name] = summary
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
