"""``tropical-profile show``: how the fitted step-time model matches a profile's samples, by kind of step."""

from __future__ import annotations

import statistics
from collections import defaultdict

from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors.fitting import sample_features
from tropical_sched.predictors.profile import Profile, StepSample
from tropical_sched.predictors.step_time import FEATURE_NAMES

__all__ = ["fit_table", "plot_fit", "predicted_step_times_s", "step_kind"]


def step_kind(sample: StepSample) -> str:
    """``prefill`` (one chunk from position 0, no decodes), ``chunk`` (one chunk at a later position),
    ``batched-prefill``, ``decode`` (decodes only) or ``mixed`` (decodes and prefill chunks)."""
    if sample.num_decode_seqs and sample.prefill_chunks:
        return "mixed"
    if sample.num_decode_seqs:
        return "decode"
    if len(sample.prefill_chunks) > 1:
        return "batched-prefill"
    return "prefill" if sample.prefill_chunks[0][0] == 0 else "chunk"


def predicted_step_times_s(profile: Profile) -> list[float]:
    """The fitted model's prediction for every sample, seconds, in sample order."""
    coefficients = [profile.file.fit.coefficients[name] for name in FEATURE_NAMES]
    return [float(t) for t in sample_features(profile.file.samples) @ coefficients]


def fit_table(profile: Profile) -> str:
    """A text table: per kind of step, samples (fitted / all), median measured time, and the median and maximum
    relative error of the prediction over the fitted samples; then the coefficients."""
    by_kind: dict[str, list[tuple[StepSample, float]]] = defaultdict(list)
    for sample, predicted in zip(profile.file.samples, predicted_step_times_s(profile), strict=True):
        by_kind[step_kind(sample)].append((sample, predicted))
    lines = [f"{'kind':16s} {'fitted':>7s} {'all':>6s} {'median ms':>10s} {'median err':>11s} {'max err':>8s}"]
    for kind in ("prefill", "chunk", "batched-prefill", "decode", "mixed"):
        rows = by_kind.get(kind, [])
        if not rows:
            continue
        fitted = [(s, p) for s, p in rows if s.used_in_fit]
        errors = [abs(p - s.step_time_s) / s.step_time_s for s, p in fitted] or [float("nan")]
        lines.append(
            f"{kind:16s} {len(fitted):7d} {len(rows):6d} "
            f"{statistics.median(s.step_time_s for s, _ in rows) * 1e3:10.3f} "
            f"{statistics.median(errors):11.1%} {max(errors):8.1%}"
        )
    lines.append("coefficients: " + ", ".join(f"{k}={v:.4g}" for k, v in profile.file.fit.coefficients.items()))
    return "\n".join(lines)


def plot_fit(profile: Profile, path: str) -> None:
    """Write a PNG: measured against predicted step time (log-log, one colour per kind), and the whole-prefill
    time against prompt length with the fitted quadratic. Needs matplotlib (``pip install tropical-sched[plot]``).

    Raises:
        ConfigError: matplotlib is not installed (the message names the extra to install).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'tropical-sched[plot]'") from None

    samples = profile.file.samples
    predicted = predicted_step_times_s(profile)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sample, p in zip(samples, predicted, strict=True):
        by_kind[step_kind(sample)].append((sample.step_time_s * 1e3, p * 1e3))
    for kind, points in sorted(by_kind.items()):
        left.scatter([m for m, _ in points], [p for _, p in points], s=8, label=kind, alpha=0.7)
    low = min(min(m, p) for points in by_kind.values() for m, p in points)
    high = max(max(m, p) for points in by_kind.values() for m, p in points)
    left.plot([low, high], [low, high], color="grey", linewidth=0.8)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="measured step time (ms)",
        ylabel="predicted (ms)",
        title=f"{profile.name}: fit R^2 {profile.file.fit.r2:.3f}",
    )
    left.legend()
    prefills = sorted((s.prefill_chunks[0][1], s.step_time_s * 1e3) for s in samples if step_kind(s) == "prefill")
    if prefills:
        right.scatter([n for n, _ in prefills], [t for _, t in prefills], s=10, label="measured")
        lengths = sorted({n for n, _ in prefills})
        model = profile.step_time
        right.plot(lengths, [model.prefill_time_s(n) * 1e3 for n in lengths], color="C1", label="fitted")
        right.set(xlabel="prompt tokens", ylabel="prefill step time (ms)", title="prefill at batch size 1")
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
