"""Arrival processes: rescale a real trace to a target rate, or draw Poisson or Gamma arrivals."""

from __future__ import annotations

import numpy as np

from tropical_sched.core.errors import ConfigError

__all__ = ["gamma_arrivals", "poisson_arrivals", "rescale_arrivals"]


def _check_rate(rate_per_s: float) -> None:
    if not (np.isfinite(rate_per_s) and rate_per_s > 0):
        raise ConfigError(f"rate_per_s must be a positive number of requests per second, got {rate_per_s!r}")


def rescale_arrivals(arrival_at_s: np.ndarray, rate_per_s: float) -> np.ndarray:
    """Scale a trace's inter-arrival times so that its mean rate becomes ``rate_per_s``.

    The burst pattern of the real trace is kept; only the time axis is stretched. The mean rate of ``n`` arrivals
    is ``(n - 1) / (t_last - t_first)``.

    Args:
        arrival_at_s: sorted arrival times, seconds, shape (n,), n >= 2.
        rate_per_s: target mean rate, requests per second, > 0.

    Returns:
        New arrival times starting at 0, seconds, shape (n,).

    Raises:
        ConfigError: the rate is not positive, or the arrivals span no time.
    """
    _check_rate(rate_per_s)
    shifted = np.asarray(arrival_at_s, dtype=np.float64) - float(arrival_at_s[0])
    if len(shifted) < 2:
        return shifted
    span_s = float(shifted[-1])
    if span_s <= 0:
        raise ConfigError("cannot rescale arrivals that all happen at the same instant")
    current_rate = (len(shifted) - 1) / span_s
    return shifted * (current_rate / rate_per_s)


def poisson_arrivals(num_requests: int, rate_per_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals: exponential inter-arrival times with mean ``1 / rate_per_s``, first arrival at 0.

    Args:
        num_requests: how many arrivals, >= 1.
        rate_per_s: mean rate, requests per second, > 0.
        rng: the seeded generator to draw from.

    Returns:
        Arrival times, seconds, shape (num_requests,).
    """
    return gamma_arrivals(num_requests, rate_per_s, rng, cv=1.0)


def gamma_arrivals(num_requests: int, rate_per_s: float, rng: np.random.Generator, *, cv: float = 1.0) -> np.ndarray:
    """Gamma-distributed inter-arrival times with mean ``1 / rate_per_s`` and coefficient of variation ``cv``.

    ``cv`` = 1 is Poisson; larger is burstier (shape ``k = 1 / cv^2``, scale ``1 / (rate * k)``), as in vLLM's
    ``--burstiness`` (which is ``k``).

    Args:
        num_requests: how many arrivals, >= 1.
        rate_per_s: mean rate, requests per second, > 0.
        rng: the seeded generator to draw from.
        cv: coefficient of variation of the inter-arrival times, > 0.

    Returns:
        Arrival times, seconds, shape (num_requests,), first at 0.

    Raises:
        ConfigError: a parameter is out of range.
    """
    _check_rate(rate_per_s)
    if num_requests < 1:
        raise ConfigError(f"num_requests must be >= 1, got {num_requests!r}")
    if not (np.isfinite(cv) and cv > 0):
        raise ConfigError(f"cv must be a positive number, got {cv!r}")
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)
