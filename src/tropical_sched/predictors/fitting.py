"""Fit the step-time model to profile samples (non-negative least squares on relative error)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors.profile import FitReport, StepSample
from tropical_sched.predictors.step_time import FEATURE_NAMES, step_features

__all__ = ["fit_step_time", "sample_features"]


def sample_features(samples: Sequence[StepSample]) -> np.ndarray:
    """Feature matrix of samples, shape (n_samples, len(FEATURE_NAMES))."""
    return np.array(
        [step_features(s.num_decode_seqs, s.num_decode_context_tokens, s.prefill_chunks) for s in samples],
        dtype=float,
    )


def fit_step_time(samples: Sequence[StepSample], exclusion_note: str = "") -> FitReport:
    """Fit the step-time model's coefficients to the samples marked ``used_in_fit``.

    Minimises the squared *relative* error (weights ``1 / t^2``) so that short decode steps count as much as long
    prefills, under non-negativity constraints (scikit-learn ``LinearRegression(positive=True)``), which keeps
    every prediction monotone in every feature. Columns are scaled to unit maximum before the fit.

    Args:
        samples: all samples; those with ``used_in_fit=False`` are counted as excluded.
        exclusion_note: why samples were excluded, recorded in the report.

    Returns:
        The coefficients and the fit error on the used samples (R^2, max and median relative error).

    Raises:
        ConfigError: fewer used samples than coefficients.
    """
    from sklearn.linear_model import LinearRegression  # import here: only profile building needs scikit-learn

    used = [s for s in samples if s.used_in_fit]
    if len(used) < len(FEATURE_NAMES):
        raise ConfigError(
            f"fit_step_time needs at least {len(FEATURE_NAMES)} samples with used_in_fit=true, got {len(used)}"
        )
    x = sample_features(used)
    y = np.array([s.step_time_s for s in used])
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    regression = LinearRegression(fit_intercept=False, positive=True)
    regression.fit(x / scale, y, sample_weight=1.0 / y**2)
    coefficients = np.maximum(regression.coef_ / scale, 0.0)
    predicted = x @ coefficients
    relative_error = np.abs(predicted - y) / y
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((predicted - y) ** 2).sum()) / total if total > 0 else 1.0
    return FitReport(
        method="non-negative least squares on relative error (scikit-learn LinearRegression(positive=True))",
        coefficients={name: float(c) for name, c in zip(FEATURE_NAMES, coefficients, strict=True)},
        r2=r2,
        max_relative_error=float(relative_error.max()),
        median_relative_error=float(np.median(relative_error)),
        num_samples_fitted=len(used),
        num_samples_excluded=len(samples) - len(used),
        exclusion_note=exclusion_note,
    )
