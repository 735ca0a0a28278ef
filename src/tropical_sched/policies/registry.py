"""The one explicit registry of scheduling policies. Every built-in policy is registered here, nowhere else."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tropical_sched.core.errors import ConfigError, UnknownNameError
from tropical_sched.policies.base import Policy, PolicyContext
from tropical_sched.policies.baselines import ColocatedConfig, ColocatedPolicy, DistServeConfig, DistServePolicy
from tropical_sched.policies.scorpio import ScorpioConfig, ScorpioPolicy
from tropical_sched.policies.slos_serve import SlosServeConfig, SlosServePolicy
from tropical_sched.policies.tempo import TempoConfig, TempoPolicy
from tropical_sched.policies.toggle import ToggleConfig
from tropical_sched.policies.tropical import TropicalConfig, TropicalPolicy

__all__ = ["POLICIES", "PolicyEntry", "make_policy", "policy_names"]


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """A registered policy.

    Attributes:
        name: registry name (``--policies``).
        summary: one line for ``tropical list``.
        config_type: the dataclass of its options.
        build: ``(context, config) -> Policy``.
    """

    name: str
    summary: str
    config_type: type
    build: Callable[[PolicyContext, Any], Policy]


POLICIES: dict[str, PolicyEntry] = {
    e.name: e
    for e in (
        PolicyEntry(
            "tropical",
            "prefill workers + multiplexing workers; SLO-slack routing and an attainment toggle (Tropical)",
            TropicalConfig,
            lambda ctx, cfg: TropicalPolicy(ctx, cfg),
        ),
        PolicyEntry(
            "vllm",
            "colocated, prefill-prioritised FCFS without chunked prefill (vLLM 0.5 default)",
            ColocatedConfig,
            lambda ctx, cfg: ColocatedPolicy(ctx, chunked=False, config=cfg),
        ),
        PolicyEntry(
            "vllm-chunked",
            "colocated, stall-free chunked prefill with a token budget (Sarathi-Serve)",
            ColocatedConfig,
            lambda ctx, cfg: ColocatedPolicy(ctx, chunked=True, config=cfg),
        ),
        PolicyEntry(
            "distserve",
            "disaggregated prefill pool + decode pool with KV transfer, FCFS (DistServe)",
            DistServeConfig,
            lambda ctx, cfg: DistServePolicy(ctx, cfg),
        ),
        PolicyEntry(
            "scorpio",
            "colocated; TTFT guard (deadline order, rejection) + TPOT guard (VBS admission, credit batching)",
            ScorpioConfig,
            lambda ctx, cfg: ScorpioPolicy(ctx, cfg),
        ),
        PolicyEntry(
            "slos-serve",
            "colocated; decode planner sets prefill budgets, admission DP over deadlines, best-effort rest",
            SlosServeConfig,
            lambda ctx, cfg: SlosServePolicy(ctx, cfg),
        ),
        PolicyEntry(
            "tempo",
            "colocated; service gain, quantile output-length bound, gain-density priority, decode pacing",
            TempoConfig,
            lambda ctx, cfg: TempoPolicy(ctx, cfg),
        ),
    )
}
"""Registered policies by name."""


def policy_names() -> list[str]:
    """Registered policy names, in registry order."""
    return list(POLICIES)


def _make_config(config_type: type, options: Mapping[str, Any], policy: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"policy {policy!r} has no option(s) {unknown}; options: {sorted(known)}")
    values = dict(options)
    if isinstance(values.get("toggle"), Mapping):
        try:
            values["toggle"] = ToggleConfig(**values["toggle"])
        except TypeError as exc:
            raise ConfigError(f"policy {policy!r}: bad toggle option: {exc}") from None
    try:
        return config_type(**values)
    except TypeError as exc:
        raise ConfigError(f"policy {policy!r}: {exc}") from None


def make_policy(name: str, context: PolicyContext, options: Mapping[str, Any] | None = None) -> Policy:
    """Build a registered policy.

    Args:
        name: registry name.
        context: predictor and model limits.
        options: fields of the policy's config dataclass (for ``tropical``, ``toggle`` may be a mapping of
            :class:`ToggleConfig` fields).

    Returns:
        A fresh policy object (policies keep state, such as the toggle: use one per run).

    Raises:
        UnknownNameError: the name is not registered.
        ConfigError: an option is unknown or out of range.
    """
    entry = POLICIES.get(name)
    if entry is None:
        raise UnknownNameError("policy", name, policy_names())
    return entry.build(context, _make_config(entry.config_type, options or {}, name))
