"""Online calibration: the live deployment corrects its step-time model and its P/D hop cost from what it observes.

Unifying idea: the offline profile is a prior, not the truth. Every observation of the served engine (a decode
stream's mean inter-token gap against the batch it ran in, a prefill that ran alone, a P/D hop) is one row of a
least-squares problem whose unknowns are the profile's coefficients; the fit starts at the profile, and moves only
as far as the observations pull it. The router and the simulator feed the same :class:`InstanceCalibration`, so
both run this one piece of code.

Method (both calibrators): exponentially weighted least squares, regularized towards the prior, under box
constraints, behind an outlier gate.

* **Exponential forgetting.** Observation ``i`` of ``n`` weighs ``lambda^(n - i)``, with ``lambda = 2^(-1 / H)``
  for a half-life of ``H`` observations, so the fit follows an engine whose speed changes (Ljung, *System
  Identification: Theory for the User*, 2nd ed., 1999, section 11.2, "RLS with a forgetting factor").
* **Regularization that is not forgotten.** The pull towards the prior stays constant while the data decay, which
  keeps the problem well posed in directions the observations stop exciting (no covariance wind-up): Gunnarsson,
  "Combining tracking and regularization in recursive least squares identification", Proc. 35th IEEE CDC, 1996.
  With at most six unknowns the regularized normal equations are solved outright after each observation (a
  6 x 6 system) instead of being updated recursively, which is what allows the constant regularization and the
  constraints.
* **Step times in ratios to the prior, rows in relative error.** The unknowns are ``r_j = c_j / c_j(prior)``; a
  row is divided by the time the current fit predicts for it, kept within a factor 2 of the observed time, so a
  5 ms decode step and a 500 ms prefill count alike (as the offline fit does,
  :func:`~tropical_sched.predictors.fitting.fit_step_time`). Dividing by the prediction rather than by the
  observation keeps the fit unbiased under noise (minimizing ``sum((t - p) / t)^2`` biases ``p`` low by about the
  noise's relative variance); the factor-2 bounds keep a prior that is far off, or a change of the engine, from
  giving some rows a hundred times the weight of others.
* **Prior.** A log-normal prior around the profile scaled by ``g``, ``prior_weight * sum_j (log r_j - log g)^2``,
  where ``g`` is the running geometric mean of observed / prior-predicted step time: a different machine, thread
  count or serving stack mostly scales every term alike, so terms the observations barely separate (a prefill's
  ``const_s`` and ``per_prefill_seq_s``) follow the others; in logs, a term 10x off is pulled back no harder than
  one 1/10x off (maximum a posteriori estimation with a Gaussian prior on log ratios: Bishop, *Pattern Recognition
  and Machine Learning*, 2006, section 3.3; its Gauss-Newton quadratic at the previous solution is refitted after
  every observation). Terms the prior fitted as 0 stay 0. Each ratio is kept within ``[min_ratio, max_ratio]``
  (a box-constrained quadratic program, solved exactly by a primal active-set method: Nocedal and Wright,
  *Numerical Optimization*, 2nd ed., 2006, section 16.5).
* **Outliers.** An observation whose log error against the current fit exceeds ``outlier_threshold`` times the
  running mean absolute log error of its kind (decode, prefill, mixed steps; the hop) is rejected; the running
  error scale still takes it in, clipped, so that a lasting change of the engine is accepted after a few
  observations while a single stall or token burst is not. The first ``min_samples`` observations of a kind are
  judged together by their median and median absolute deviation. A robust threshold from a running error scale
  as in Zou, Chan and Ng, "Least mean M-estimate algorithms for robust adaptive filtering in impulse noise", IEEE
  Trans. Circuits Syst. II 47(12), 2000; the clipped scale update is Huber's (Huber, "Robust estimation of a
  location parameter", Ann. Math. Statist. 35(1), 1964).
* **Safe start.** Until ``min_samples`` observations are in, the calibrated model is the prior itself.

The P/D hop is fitted the same way in absolute seconds, ``hop = fixed + per_token * num_prompt_tokens``, both terms
>= 0 and at most ``max_hop_s``, regularized towards the profile's hop (0 when it records none).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tropical_sched.core.errors import ConfigError
from tropical_sched.core.slack import decode_first_token_wait_s
from tropical_sched.predictors.profile import Profile, ProfileFile, ServingOverheads, calibrated_profile_file
from tropical_sched.predictors.step_time import (
    FEATURE_NAMES,
    StepTimeCoefficients,
    StepTimeModel,
    step_features,
)

__all__ = [
    "CALIBRATION_METHOD",
    "CalibrationConfig",
    "HopCalibrator",
    "InstanceCalibration",
    "StepTimeCalibrator",
    "observed_pd_hop_s",
    "served_step_time",
]

CALIBRATION_METHOD = (
    "online calibration: exponentially forgetting least squares on relative error, ridge prior at the profile "
    "(scaled), ratios clamped, outliers gated (tropical_sched.predictors.calibration)"
)
"""One line naming the method, recorded in calibrated profiles' fit section."""

_MAD_TO_SIGMA = 1.4826  # median absolute deviation of a normal sample / its standard deviation
_NORM_RANGE = 2.0  # a step-time row's normalizer stays within this factor of the observed time


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationConfig:
    """How far and how fast online calibration may move away from the offline profile.

    Attributes:
        half_life_samples: observations after which an observation weighs half as much, > 0.
        prior_weight: strength of the pull towards the prior, in observations' worth, > 0 (on the step-time
            ratios' logs, see the module docstring; on the hop's terms in units of ``hop_reference_s``). Stronger
            keeps noisy observations closer to the profile; weaker learns terms that are off by different factors
            sooner.
        scale_prior_weight: how many observations' worth the profile's own scale counts in the running scale
            ``g`` the prior is centred on, > 0.
        min_ratio: smallest calibrated coefficient / prior coefficient, in (0, 1].
        max_ratio: largest calibrated coefficient / prior coefficient, >= 1.
        min_samples: observations before any correction applies (the model is the prior until then); also the
            size of each kind's first batch, judged together for outliers, >= 1.
        outlier_threshold: an observation whose absolute log error exceeds this many times its kind's running
            mean absolute log error is rejected, > 1.
        min_error_scale: floor of that running scale (log units: 0.03 is about 3%), > 0; keeps noise-free
            observations from rejecting everything that is not exact.
        error_scale_half_life_samples: half-life of the running error scale, observations, > 0.
        hop_reference_s: the unit the hop is fitted in, seconds, > 0; also sets the hop's log-error floor
            (a tenth of it), so that hops of a few milliseconds are not judged by their relative error alone.
        hop_reference_prompt_tokens: the prompt length the hop's per-token term is scaled by, tokens, >= 1.
        max_hop_s: largest hop either term may predict at ``hop_reference_prompt_tokens``, seconds, > 0.
        num_recent: accepted observations kept to report the fit's recent errors, >= 1.

    Raises:
        ConfigError: a value is out of its range.
    """

    half_life_samples: float = 500.0
    prior_weight: float = 0.05
    scale_prior_weight: float = 1.0
    min_ratio: float = 0.05
    max_ratio: float = 20.0
    min_samples: int = 10
    outlier_threshold: float = 6.0
    min_error_scale: float = 0.05
    error_scale_half_life_samples: float = 20.0
    hop_reference_s: float = 0.05
    hop_reference_prompt_tokens: int = 1000
    max_hop_s: float = 60.0
    num_recent: int = 256

    def __post_init__(self) -> None:
        positive = (
            "half_life_samples",
            "prior_weight",
            "scale_prior_weight",
            "min_error_scale",
            "error_scale_half_life_samples",
            "hop_reference_s",
            "max_hop_s",
        )
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"CalibrationConfig.{name} must be finite and > 0, got {value!r}")
        if not (0 < self.min_ratio <= 1):
            raise ConfigError(f"CalibrationConfig.min_ratio must be in (0, 1], got {self.min_ratio!r}")
        if not (math.isfinite(self.max_ratio) and self.max_ratio >= 1):
            raise ConfigError(f"CalibrationConfig.max_ratio must be finite and >= 1, got {self.max_ratio!r}")
        if not (math.isfinite(self.outlier_threshold) and self.outlier_threshold > 1):
            raise ConfigError(
                f"CalibrationConfig.outlier_threshold must be finite and > 1, got {self.outlier_threshold!r}"
            )
        for name in ("min_samples", "hop_reference_prompt_tokens", "num_recent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CalibrationConfig.{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def forgetting_factor(self) -> float:
        """``lambda = 2^(-1 / half_life_samples)``: the weight an observation keeps per later observation."""
        return math.pow(2.0, -1.0 / self.half_life_samples)


# -- the estimator ----------------------------------------------------------------------------------------------


def _kkt_solution(
    hessian: np.ndarray, linear: np.ndarray, lower: np.ndarray, upper: np.ndarray, bound: np.ndarray
) -> np.ndarray | None:
    """The box QP's solution if ``bound`` (-1: at the lower bound, +1: at the upper one, 0: free, per variable) is
    its active set, else ``None``: the free variables solved with the others at their bounds must lie within the
    box, and every bound variable's multiplier must have the right sign (the KKT conditions; the solution of a
    strictly convex QP is unique, so it is the minimizer)."""
    free = bound == 0
    x = np.where(bound < 0, lower, upper)
    if free.any():
        fixed = ~free
        rhs = linear[free] - hessian[np.ix_(free, fixed)] @ x[fixed]
        x[free] = np.linalg.solve(hessian[np.ix_(free, free)], rhs)
        if np.any(x[free] < lower[free]) or np.any(x[free] > upper[free]):
            return None
    gradient = hessian @ x - linear
    tolerance = 1e-12 * max(1.0, float(np.abs(linear).max()))
    if np.any(gradient[bound < 0] < -tolerance) or np.any(gradient[bound > 0] > tolerance):
        return None
    return x


def _active_bounds(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """-1 / +1 where ``x`` is at its lower / upper bound, 0 elsewhere: the active set of a box QP's solution."""
    return np.where(x <= lower, -1, np.where(x >= upper, 1, 0))


def _box_qp(
    hessian: np.ndarray,
    linear: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    active_hint: np.ndarray | None = None,
) -> np.ndarray:
    """``argmin 0.5 x'Hx - linear'x`` subject to ``lower <= x <= upper``, for a symmetric positive definite ``H``.

    Primal active-set method (Nocedal and Wright, section 16.5): solve on the free variables, step towards that
    solution until a bound blocks (which fixes the variable there), and free a fixed variable whose multiplier has
    the wrong sign; each iteration lowers the objective, so it ends in finitely many steps.

    ``active_hint`` (as :func:`_active_bounds` returns it), typically the previous solution's active set: when it
    is this problem's too (checked by the KKT conditions), its solution is returned at the cost of one solve on
    the free variables; the answer is the same minimizer either way.
    """
    if active_hint is not None and active_hint.any():
        warm = _kkt_solution(hessian, linear, lower, upper, active_hint)
        if warm is not None:
            return warm
    k = len(linear)
    unconstrained = np.linalg.solve(hessian, linear)
    if np.all(unconstrained >= lower) and np.all(unconstrained <= upper):
        return unconstrained  # the usual case: no bound binds
    x: np.ndarray = np.clip(unconstrained, lower, upper)
    free = (x > lower) & (x < upper)
    tolerance = 1e-12 * max(1.0, float(np.abs(linear).max()))
    for _ in range(8 * k + 8):
        target = x.copy()
        if free.any():
            fixed = ~free
            rhs = linear[free] - hessian[np.ix_(free, fixed)] @ x[fixed]
            target[free] = np.linalg.solve(hessian[np.ix_(free, free)], rhs)
        step = target - x
        alpha, blocking = 1.0, -1
        for j in np.flatnonzero(free):
            if step[j] < 0 and target[j] < lower[j]:
                a = (lower[j] - x[j]) / step[j]
            elif step[j] > 0 and target[j] > upper[j]:
                a = (upper[j] - x[j]) / step[j]
            else:
                continue
            if a < alpha:
                alpha, blocking = a, int(j)
        x = np.clip(x + alpha * step, lower, upper)
        if blocking >= 0:
            x[blocking] = lower[blocking] if step[blocking] < 0 else upper[blocking]
            free[blocking] = False
            continue
        gradient = hessian @ x - linear
        wrong = np.where(~free & (x <= lower), -gradient, 0.0) + np.where(~free & (x >= upper), gradient, 0.0)
        worst = int(np.argmax(wrong))
        if wrong[worst] <= tolerance:
            return x
        free[worst] = True
    return x


class _ForgettingRidge:
    """Exponentially weighted least squares with a constant ridge prior, under box constraints.

    Minimizes ``sum_i lambda^(n-i) w_i (y_i - a_i . x)^2 + (x - centre)' diag(penalty) (x - centre)`` over
    ``lower <= x <= upper``. The data statistics decay; the penalty is set by the caller at every solve.
    """

    def __init__(self, size: int, lower: np.ndarray, upper: np.ndarray, forgetting: float) -> None:
        self._gram = np.zeros((size, size))
        self._moment = np.zeros(size)
        self._lower = lower
        self._upper = upper
        self._forgetting = forgetting
        self._active: np.ndarray | None = None  # the last solution's active set: the next solve's warm start
        self.effective_samples = 0.0  # sum of the decayed weights

    def add(self, row: np.ndarray, target: float, weight: float) -> None:
        """Decay the past by one observation and add ``(row, target)`` with ``weight``."""
        f = self._forgetting
        self._gram *= f
        self._moment *= f
        self._gram += weight * np.outer(row, row)
        self._moment += (weight * target) * row
        self.effective_samples = f * self.effective_samples + weight

    def solve(self, centre: np.ndarray, penalty: np.ndarray) -> np.ndarray:
        """The constrained minimizer for the given prior (``penalty`` > 0 element-wise)."""
        hessian = self._gram + np.diag(penalty)
        x = _box_qp(hessian, self._moment + penalty * centre, self._lower, self._upper, self._active)
        self._active = _active_bounds(x, self._lower, self._upper)
        return x


@dataclass(slots=True)
class _Observation:
    row: np.ndarray  # the least-squares row (normalized)
    target: float  # the normalized target
    weight: float
    observed_s: float  # what was observed, seconds
    norm_s: float  # seconds per unit of row . x (the row's normalization)
    features: tuple[float, ...] = ()  # the step's features (step-time observations)


@dataclass(slots=True)
class _Gate:
    """Outlier gate of one kind of observation."""

    scale: float | None = None  # running mean absolute log error; None during the first batch
    pending: list[_Observation] = field(default_factory=list)


class _Calibrator:
    """What both calibrators share: the estimator, the outlier gates, the counts and the recent observations."""

    def __init__(self, size: int, lower: np.ndarray, upper: np.ndarray, config: CalibrationConfig) -> None:
        self.config = config
        self._estimator = _ForgettingRidge(size, lower, upper, config.forgetting_factor)
        self._x = np.ones(size)  # current solution (set by the subclass)
        self._gates: dict[str, _Gate] = {}
        self._scale_alpha = 1.0 - math.pow(2.0, -1.0 / config.error_scale_half_life_samples)
        self._recent: deque[_Observation] = deque(maxlen=config.num_recent)
        self._log_floor_s = 0.0  # added to both sides of a log error (hops may be ~0)
        self.num_samples = 0
        """Observations used by the fit."""
        self.num_rejected = 0
        """Observations rejected as outliers."""
        self.version = 0
        """Changes whenever the fit does."""

    # -- subclass hooks ---------------------------------------------------------------------------------------

    def _refit(self) -> None:
        raise NotImplementedError

    def _on_accepted(self, observation: _Observation) -> None:
        """Called for each accepted observation before the refit."""

    # -- shared machinery -------------------------------------------------------------------------------------

    def _predicted_s(self, observation: _Observation) -> float:
        return float(observation.row @ self._x) * observation.norm_s

    def _log_error(self, observation: _Observation) -> float:
        floor = self._log_floor_s
        observed = max(observation.observed_s, 0.0) + floor
        predicted = max(self._predicted_s(observation), 0.0) + floor
        if predicted <= 0.0 or observed <= 0.0:
            return math.inf
        return math.log(observed / predicted)

    def _feed(self, observations: Sequence[_Observation]) -> None:
        for observation in observations:
            self._estimator.add(observation.row, observation.target, observation.weight)
            self._on_accepted(observation)
            self._recent.append(observation)
        self.num_samples += len(observations)
        self._refit()
        self.version += 1

    def _observe(self, kind: str, observation: _Observation) -> bool:
        config = self.config
        gate = self._gates.setdefault(kind, _Gate())
        if gate.scale is None:
            # First batch of this kind: judge it as a whole, by its median and median absolute deviation (a single
            # stall among the first observations must not become the reference).
            gate.pending.append(observation)
            if len(gate.pending) < config.min_samples:
                return True
            errors = np.array([self._log_error(o) for o in gate.pending])
            finite = errors[np.isfinite(errors)]
            centre = float(np.median(finite)) if finite.size else 0.0
            spread = (
                max(_MAD_TO_SIGMA * float(np.median(np.abs(finite - centre))), config.min_error_scale)
                if finite.size
                else config.min_error_scale
            )
            keep = np.abs(errors - centre) <= config.outlier_threshold * spread
            accepted = [o for o, k in zip(gate.pending, keep, strict=True) if k]
            self.num_rejected += len(gate.pending) - len(accepted)
            gate.pending = []
            if accepted:
                self._feed(accepted)
                after = [abs(self._log_error(o)) for o in accepted]
                gate.scale = max(sum(after) / len(after), config.min_error_scale)
            return bool(keep[-1])
        error = abs(self._log_error(observation))
        accepted_now = error <= config.outlier_threshold * gate.scale
        # Huber's clipped update of the scale: a lasting change raises it until the new regime is accepted; a
        # single huge error moves it by at most a few percent.
        clipped = min(error, 2.0 * config.outlier_threshold * gate.scale)
        gate.scale = max(gate.scale + self._scale_alpha * (clipped - gate.scale), config.min_error_scale)
        if accepted_now:
            self._feed([observation])
        else:
            self.num_rejected += 1
        return accepted_now

    def recent_predictions(self) -> list[tuple[float, float]]:
        """``(predicted_s, observed_s)`` of the current fit on the recent accepted observations (at most
        ``config.num_recent``), oldest first."""
        return [(self._predicted_s(o), o.observed_s) for o in self._recent]


# -- step times -------------------------------------------------------------------------------------------------


def _step_kind(features: Sequence[float]) -> str:
    has_prefill, has_decode = features[2] > 0, features[4] > 0
    if has_prefill and has_decode:
        return "mixed"
    return "prefill" if has_prefill else "decode"


class StepTimeCalibrator(_Calibrator):
    """The step-time model of one engine, refitted online from observed step times (see the module docstring).

    Args:
        base: the offline model, the prior; its zero coefficients stay zero, its valid range is kept.
        config: limits and rates; default :class:`CalibrationConfig`'s.

    Raises:
        ConfigError: every coefficient of ``base`` is 0.
    """

    def __init__(self, base: StepTimeModel, config: CalibrationConfig | None = None) -> None:
        config = config or CalibrationConfig()
        prior = np.array(base.coefficients.as_tuple(), dtype=float)
        active = np.flatnonzero(prior > 0)
        if active.size == 0:
            raise ConfigError(f"StepTimeCalibrator: profile {base.name or '<unnamed>'} has no non-zero coefficient")
        size = int(active.size)
        super().__init__(size, np.full(size, config.min_ratio), np.full(size, config.max_ratio), config)
        self.base = base
        self._prior = prior
        self._active = active
        self._prior_active = prior[active]
        self._log_scale_sum = 0.0  # decayed sum of log(observed / prior prediction) over accepted observations
        self._log_scale_weight = 0.0  # decayed sum of their weights
        self._model = base
        self._model_version = 0

    @property
    def scale(self) -> float:
        """``g``: the running geometric mean of observed / prior-predicted step time (1 before any observation),
        shrunk towards 1 by ``config.scale_prior_weight``; the ridge prior's centre is the profile times ``g``."""
        weight = self._log_scale_weight + self.config.scale_prior_weight
        g = math.exp(self._log_scale_sum / weight)
        return min(max(g, self.config.min_ratio), self.config.max_ratio)

    def _on_accepted(self, observation: _Observation) -> None:
        f = self.config.forgetting_factor
        prior_s = float(observation.row.sum()) * observation.norm_s  # row = prior terms / norm
        self._log_scale_sum = f * self._log_scale_sum + observation.weight * math.log(observation.observed_s / prior_s)
        self._log_scale_weight = f * self._log_scale_weight + observation.weight

    def _refit(self) -> None:
        # The prior is log-normal around the scaled profile, prior_weight * sum((log r_j - log g)^2): scale-free, so
        # a term 10x off the others is pulled back as hard as one 1/10x off. Its Gauss-Newton quadratic at the
        # previous solution r0 has weight prior_weight / r0^2 and centre r0 * (1 - log(r0 / g)); refitting after
        # every observation iterates it to the exact optimum.
        g = self.scale
        current = self._x
        self._x = self._estimator.solve(current * (1.0 - np.log(current / g)), self.config.prior_weight / current**2)

    def observe(self, features: Sequence[float], observed_s: float, weight: float = 1.0) -> bool:
        """Take in one observed step (or a sum of steps: the model is linear, so summed features price summed
        times).

        Args:
            features: the step's features in :data:`~tropical_sched.predictors.step_time.FEATURE_NAMES` order, as
                :func:`~tropical_sched.predictors.step_time.step_features` returns them (summed over steps for a
                sum of steps).
            observed_s: the observed time, seconds.
            weight: the observation's weight (1: one observation's worth), > 0.

        Returns:
            Whether the fit uses it: ``False`` for an outlier, and for an observation that cannot inform the fit (a
            time that is not finite and > 0, a weight that is not, features the prior prices at 0). The first
            ``config.min_samples`` observations of a kind (decode, prefill, mixed) are judged together when the
            last of them arrives; ``True`` until then.

        Raises:
            ConfigError: ``features`` does not have one value per coefficient.
        """
        if len(features) != len(FEATURE_NAMES):
            raise ConfigError(
                f"StepTimeCalibrator.observe: expected {len(FEATURE_NAMES)} features, got {len(features)}"
            )
        if not (math.isfinite(observed_s) and observed_s > 0 and math.isfinite(weight) and weight > 0):
            return False
        values = np.asarray(features, dtype=float)
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            return False
        terms = values[self._active] * self._prior_active
        if terms.sum() <= 0:
            return False
        # Relative error: the row is divided by the time the current fit predicts (independent of this
        # observation's noise, so unbiased), kept within a factor 2 of the observed time (so that neither a wrong
        # prior nor a change of the engine gives some rows a hundred times the weight of others).
        predicted_s = float(terms @ self._x)
        norm_s = min(max(predicted_s, observed_s / _NORM_RANGE), observed_s * _NORM_RANGE)
        observation = _Observation(
            row=terms / norm_s,
            target=observed_s / norm_s,
            weight=weight,
            observed_s=observed_s,
            norm_s=norm_s,
            features=tuple(float(v) for v in values),
        )
        return self._observe(_step_kind(features), observation)

    def recent_observations(self) -> list[tuple[tuple[float, ...], float]]:
        """``(features, observed_s)`` of the recent accepted observations (at most ``config.num_recent``), oldest
        first: to compare the calibrated model with the prior on what was actually seen."""
        return [(o.features, o.observed_s) for o in self._recent]

    def observe_step(
        self,
        *,
        num_decode_seqs: int,
        num_decode_context_tokens: int,
        prefill_chunks: Sequence[tuple[int, int]] = (),
        observed_s: float,
    ) -> bool:
        """:meth:`observe` one engine step given by its composition (as ``StepTimeModel.step_time_s`` takes it)."""
        return self.observe(step_features(num_decode_seqs, num_decode_context_tokens, prefill_chunks), observed_s)

    @property
    def ratios(self) -> tuple[float, ...]:
        """Calibrated / prior coefficient per :data:`~tropical_sched.predictors.step_time.FEATURE_NAMES` entry (1
        for a coefficient the prior has at 0, which stays 0), as the current fit has them."""
        ratios = np.ones(len(FEATURE_NAMES))
        ratios[self._active] = self._x
        return tuple(float(r) for r in ratios)

    @property
    def model(self) -> StepTimeModel:
        """The calibrated model (``base`` itself until ``config.min_samples`` observations are in)."""
        if self.num_samples < self.config.min_samples:
            return self.base
        if self._model_version != self.version:
            coefficients = self._prior.copy()
            coefficients[self._active] = self._prior_active * self._x
            self._model = StepTimeModel(
                StepTimeCoefficients(**dict(zip(FEATURE_NAMES, coefficients.tolist(), strict=True))),
                self.base.valid_range,
                name=self.base.name,
                warned_like=self.base,  # one profile: its range warnings once, not once per calibrated model
            )
            self._model_version = self.version
        return self._model


# -- the P/D hop ------------------------------------------------------------------------------------------------


class HopCalibrator(_Calibrator):
    """The P/D hop ``fixed_s + per_prompt_token_s * num_prompt_tokens``, learned online (see the module docstring).

    Args:
        prior_fixed_s: the hop's fixed part before any observation, seconds, >= 0.
        prior_per_token_s: its part per prompt token before any observation, seconds per token, >= 0.
        config: limits and rates; default :class:`CalibrationConfig`'s.

    Raises:
        ConfigError: a prior is negative or not finite.
    """

    def __init__(
        self, prior_fixed_s: float = 0.0, prior_per_token_s: float = 0.0, config: CalibrationConfig | None = None
    ) -> None:
        config = config or CalibrationConfig()
        for name, value in (("prior_fixed_s", prior_fixed_s), ("prior_per_token_s", prior_per_token_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"HopCalibrator.{name} must be finite and >= 0, got {value!r}")
        unit_s = config.hop_reference_s
        tokens = config.hop_reference_prompt_tokens
        upper = config.max_hop_s / unit_s
        super().__init__(2, np.zeros(2), np.full(2, upper), config)
        self._log_floor_s = unit_s / 10
        # Unknowns in units of hop_reference_s: the fixed part, and the per-token part at the reference length.
        self._centre = np.minimum(np.array([prior_fixed_s / unit_s, prior_per_token_s * tokens / unit_s]), upper)
        self._x = self._centre.copy()
        self.prior_fixed_s = prior_fixed_s
        self.prior_per_token_s = prior_per_token_s

    def _refit(self) -> None:
        self._x = self._estimator.solve(self._centre, np.full(2, self.config.prior_weight))

    def observe(self, num_prompt_tokens: int, observed_s: float) -> bool:
        """Take in one observed hop.

        Args:
            num_prompt_tokens: the prompt's length, tokens, >= 1.
            observed_s: the hop, seconds (slightly negative values, from noise in what was subtracted to get it,
                are fine).

        Returns:
            Whether the fit uses it (``False`` for an outlier, or for a value that is not finite or a length < 1;
            ``True`` while the first ``config.min_samples`` wait to be judged together).
        """
        if num_prompt_tokens < 1 or not math.isfinite(observed_s):
            return False
        unit_s = self.config.hop_reference_s
        row = np.array([1.0, num_prompt_tokens / self.config.hop_reference_prompt_tokens])
        observation = _Observation(
            row=row, target=observed_s / unit_s, weight=1.0, observed_s=observed_s, norm_s=unit_s
        )
        return self._observe("hop", observation)

    @property
    def fixed_s(self) -> float:
        """The hop's fixed part, seconds (the prior's until ``config.min_samples`` observations are in)."""
        if self.num_samples < self.config.min_samples:
            return self.prior_fixed_s
        return float(self._x[0]) * self.config.hop_reference_s

    @property
    def per_prompt_token_s(self) -> float:
        """The hop's part per prompt token, seconds per token (the prior's until ``config.min_samples``)."""
        if self.num_samples < self.config.min_samples:
            return self.prior_per_token_s
        return float(self._x[1]) * self.config.hop_reference_s / self.config.hop_reference_prompt_tokens

    def predict_s(self, num_prompt_tokens: int) -> float:
        """The hop of a prompt of ``num_prompt_tokens`` tokens, seconds."""
        return self.fixed_s + self.per_prompt_token_s * num_prompt_tokens


# -- one instance -----------------------------------------------------------------------------------------------


def observed_pd_hop_s(
    step_time: StepTimeModel,
    *,
    waited_s: float,
    num_decoding: int,
    num_decoding_context_tokens: int,
    num_prompt_tokens: int,
) -> float:
    """A sequential P/D hop as a router observes it, for :meth:`HopCalibrator.observe`.

    ``waited_s`` (from sending the decode half to its first token) less the first decode step on the decoding
    instance (its ``num_decoding`` decodes and this one) and, when it was decoding, half a step of those decodes
    (the step in flight that the transferred request waits for, on average).

    Args:
        step_time: the decoding instance's step-time model.
        waited_s: seconds from sending the decode half to its first token.
        num_decoding: decodes on the decoding instance when the decode half was sent (or arrived), >= 0.
        num_decoding_context_tokens: their context tokens, >= 0.
        num_prompt_tokens: the request's prompt length, tokens, >= 1.

    Returns:
        The hop, seconds (may be slightly negative from noise: the calibrator takes that).
    """
    return waited_s - decode_first_token_wait_s(
        step_time,
        num_decoding=num_decoding,
        num_decoding_context_tokens=num_decoding_context_tokens,
        num_prompt_tokens=num_prompt_tokens,
    )


def served_step_time(model: StepTimeModel, serving: ServingOverheads) -> StepTimeModel:
    """The step times a client of the served engine sees: ``model`` with the serving overheads folded in.

    ``per_step_s`` joins ``const_s`` (every step pays it), ``per_streamed_token_s`` joins ``per_decode_seq_s``
    (each decode streams one token per step), and ``per_request_s`` joins ``per_prefill_seq_s`` (a prompt
    prefilled in one step pays it once; a prompt split into chunks is charged it per chunk, slightly more than
    served). This is the prior of a calibration fed from what a router observes, which contains the overheads.
    """
    c = model.coefficients
    if not (serving.per_step_s or serving.per_streamed_token_s or serving.per_request_s):
        return model
    return StepTimeModel(
        StepTimeCoefficients(
            const_s=c.const_s + serving.per_step_s,
            per_batched_token_s=c.per_batched_token_s,
            per_prefill_seq_s=c.per_prefill_seq_s + serving.per_request_s,
            per_prefill_attention_pair_s=c.per_prefill_attention_pair_s,
            per_decode_seq_s=c.per_decode_seq_s + serving.per_streamed_token_s,
            per_decode_context_token_s=c.per_decode_context_token_s,
        ),
        model.valid_range,
        name=model.name,
        warned_like=model,
    )


class InstanceCalibration:
    """Everything learned online about one engine instance: its step-time model and the P/D hop of the requests
    it prefills. The router and the simulator feed it the same observations.

    Args:
        base: the instance's offline step-time model (the prior).
        prior_pd_hop_fixed_s: the profile's P/D hop, fixed part, seconds (``Profile.serving``; 0 if none).
        prior_pd_hop_per_prompt_token_s: the profile's P/D hop per prompt token, seconds per token.
        config: limits and rates; default :class:`CalibrationConfig`'s.
        max_chunk_tokens: the engine's prefill chunk (vLLM's ``--max-num-batched-tokens``): a longer prompt
            prefilled alone takes several steps; ``None``: one step per prompt.

    Raises:
        ConfigError: as :class:`StepTimeCalibrator` and :class:`HopCalibrator`.
    """

    def __init__(
        self,
        base: StepTimeModel,
        *,
        prior_pd_hop_fixed_s: float = 0.0,
        prior_pd_hop_per_prompt_token_s: float = 0.0,
        config: CalibrationConfig | None = None,
        max_chunk_tokens: int | None = None,
    ) -> None:
        self.config = config or CalibrationConfig()
        self.step = StepTimeCalibrator(base, self.config)
        self.hop = HopCalibrator(prior_pd_hop_fixed_s, prior_pd_hop_per_prompt_token_s, self.config)
        self.max_chunk_tokens = max_chunk_tokens

    @classmethod
    def from_profile(
        cls, profile: Profile, config: CalibrationConfig | None = None, *, max_chunk_tokens: int | None = None
    ) -> InstanceCalibration:
        """The calibration of an instance served with ``profile``: its prior is the profile's step-time model with
        the profile's serving overheads folded in (:func:`served_step_time`; what a router observes contains them)
        and the profile's P/D hop."""
        serving = profile.serving
        return cls(
            served_step_time(profile.step_time, serving),
            prior_pd_hop_fixed_s=serving.pd_hop_fixed_s,
            prior_pd_hop_per_prompt_token_s=serving.pd_hop_per_prompt_token_s,
            config=config,
            max_chunk_tokens=max_chunk_tokens,
        )

    def observe_decode_stream(
        self,
        *,
        num_steps: int,
        duration_s: float,
        mean_num_decode_seqs: float,
        mean_num_decode_context_tokens: float,
    ) -> bool:
        """A decode stream: ``num_steps`` decode steps took ``duration_s`` in all, in batches of on average
        ``mean_num_decode_seqs`` decodes holding ``mean_num_decode_context_tokens`` context tokens in all (the
        model is linear, so the mean batch prices the mean step). The steps must have been decode-only.

        Returns:
            Whether the step-time fit uses it (see :meth:`StepTimeCalibrator.observe`).
        """
        if num_steps < 1 or not mean_num_decode_seqs > 0:
            return False
        d, c = mean_num_decode_seqs, mean_num_decode_context_tokens
        return self.step.observe((1.0, d, 0.0, 0.0, d, c), duration_s / num_steps)

    def prefill_features(self, num_prompt_tokens: int) -> tuple[float, ...]:
        """Features of a prompt prefilled alone, summed over its chunks (``max_chunk_tokens`` each)."""
        chunk = self.max_chunk_tokens or num_prompt_tokens
        chunks = [(prefix, min(chunk, num_prompt_tokens - prefix)) for prefix in range(0, num_prompt_tokens, chunk)]
        totals = [0.0] * len(FEATURE_NAMES)
        for prefix, size in chunks:
            for i, value in enumerate(step_features(0, 0, [(prefix, size)])):
                totals[i] += value
        return tuple(totals)

    def observe_prefill(self, *, num_prompt_tokens: int, duration_s: float) -> bool:
        """A prefill of ``num_prompt_tokens`` that ran alone on the instance (no decode, no other prefill) and
        took ``duration_s`` from the request's dispatch to its first token (a P/D prefill's return).

        Returns:
            Whether the step-time fit uses it.
        """
        if num_prompt_tokens < 1:
            return False
        return self.step.observe(self.prefill_features(num_prompt_tokens), duration_s)

    def observe_pd_hop(self, *, num_prompt_tokens: int, hop_s: float) -> bool:
        """A P/D hop of a request prefilled on this instance: from its prefill's end to its first token on the
        decoding instance, less that first decode step, seconds.

        Returns:
            Whether the hop fit uses it.
        """
        return self.hop.observe(num_prompt_tokens, hop_s)

    @property
    def step_time(self) -> StepTimeModel:
        """The calibrated step-time model."""
        return self.step.model

    @property
    def pd_hop_fixed_s(self) -> float:
        """The learned P/D hop's fixed part, seconds."""
        return self.hop.fixed_s

    @property
    def pd_hop_per_prompt_token_s(self) -> float:
        """The learned P/D hop's part per prompt token, seconds per token."""
        return self.hop.per_prompt_token_s

    @property
    def num_samples(self) -> int:
        """Observations in use, step times and hops together."""
        return self.step.num_samples + self.hop.num_samples

    def serving_overheads(self, source: str = "learned online") -> ServingOverheads:
        """The learned serving overheads: the P/D hop. The per-step, per-token and per-request overheads the
        observations contain are part of the calibrated step-time coefficients (the router sees them only
        together with the steps, and :meth:`from_profile` folds a profile's into the prior), so they are recorded
        as 0 here, which keeps a simulation from counting them twice."""
        return ServingOverheads(
            pd_hop_fixed_s=self.pd_hop_fixed_s,
            pd_hop_per_prompt_token_s=self.pd_hop_per_prompt_token_s,
            source=f"{source} ({self.hop.num_samples} hop observations)",
        )

    def profile_file(self, base: ProfileFile, note: str) -> ProfileFile:
        """The calibrated profile in the profile-file schema (:func:`calibrated_profile_file`), with the
        learned hop and the fit's errors on the recent observations."""
        return calibrated_profile_file(
            base,
            self.step_time,
            self.serving_overheads(),
            f"{note}; {self.step.num_samples} step observations, {self.step.num_rejected} rejected as outliers",
            num_observations=self.step.num_samples,
            recent=self.step.recent_predictions() if self.step.num_samples >= self.config.min_samples else (),
            method=CALIBRATION_METHOD,
        )
