"""The router's cluster configuration (YAML), validated with pydantic; errors name the file, line and field.

Example::

    policy: tropical                  # a registered policy (tropical, vllm, vllm-chunked, distserve)
    profile: a100-llama2-70b-tp4      # the latency profile the policy predicts with (name or file)
    slo:
      ttft_slo_scale: 5               # or ttft_slo_ms; per-request headers override both
      tpot_slo_ms: 100
    instances:
      - url: http://10.0.0.1:8000
        role: prefill
      - url: http://10.0.0.2:8000
        role: multiplexing
      # SGLang instances: engine: sglang (prefill ones with bootstrap_port, default 8998)
"""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tropical_sched.core.errors import ConfigError, DataFormatError
from tropical_sched.core.locate import LocatedValueError, line_of, validation_message
from tropical_sched.core.slo import SloSpec
from tropical_sched.core.snapshot import WorkerRole
from tropical_sched.predictors.calibration import CalibrationConfig

# check_base_url and engine_address are public helpers (the CLI checks --url with the first) but stay out of
# __all__, which tropical_sched.serve re-exports whole.
__all__ = [
    "CalibrationSettings",
    "ClusterFileError",
    "Engine",
    "InstanceConfig",
    "RouterConfig",
    "SloDefaults",
    "check_base_url",
    "engine_address",
    "load_router_config",
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ClusterFileError(DataFormatError):
    """The router's configuration file is malformed."""


class Engine(str, enum.Enum):
    """Serving engine of an instance."""

    VLLM = "vllm"
    SGLANG = "sglang"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_base_url(url: str) -> str:
    """Check an engine's base URL: ``http`` or ``https``, a host, a port in 1-65535 if given, no query or fragment
    (the router appends paths such as ``/v1/completions`` to it).

    Returns:
        ``url``, unchanged.

    Raises:
        ValueError: what is wrong, e.g. ``"has no host (expected e.g. http://10.0.0.1:8000)"``.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ValueError(f"is not a URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host (expected e.g. http://10.0.0.1:8000)")
    try:
        port = parts.port
    except ValueError:  # out of range or not a number; urllib would otherwise pass it on to the socket layer
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"has port {parts.netloc.rpartition(':')[2]!r}, which is not a port number in 1-65535")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment (the router appends paths to it)")
    return url


def engine_address(url: str) -> tuple[str, int, str]:
    """Where a base URL really points: ``(host, port, path)``, with the loopback and wildcard names of this machine
    (``localhost``, ``127.x.x.x``, ``::1``, ``0.0.0.0``, ``::``) as one host and the scheme's default port filled
    in, so that two spellings of one engine compare equal."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if host == "localhost" or host.endswith(".localhost") or (ip is not None and (ip.is_loopback or ip.is_unspecified)):
        host = "<this machine>"
    elif ip is not None:
        host = ip.compressed
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return host, port, parts.path.rstrip("/")


class InstanceConfig(_Strict):
    """One engine instance (one model replica, any number of GPUs).

    Attributes:
        url: base URL of its OpenAI-compatible server, e.g. ``http://127.0.0.1:8000``.
        role: ``prefill``, ``multiplexing``, ``decode`` or ``colocated``.
        engine: the engine serving it.
        profile: latency profile for this instance (name or file); default the top-level one.
        max_num_seqs: its engine's ``--max-num-seqs`` (SGLang: ``--max-running-requests``).
        num_kv_cache_tokens: its KV capacity in tokens; default the profile's.
        bootstrap_port: SGLang prefill instances: their ``--disaggregation-bootstrap-port`` (SGLang's default
            8998), sent to the decoding instance with the host of ``url`` as ``bootstrap_host``.
        max_num_batched_tokens: its engine's ``--max-num-batched-tokens`` (SGLang: ``--chunked-prefill-size``), the
            prefill chunk: online calibration prices a longer prompt prefilled alone as several steps; default
            one step per prompt.
    """

    url: str
    role: WorkerRole
    engine: Engine = Engine.VLLM
    profile: str | None = None
    max_num_seqs: Annotated[int, Field(ge=1)] = 256
    num_kv_cache_tokens: Annotated[int, Field(ge=1)] | None = None
    bootstrap_port: Annotated[int, Field(ge=1, le=65535)] = 8998
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        return check_base_url(url)


class SloDefaults(_Strict):
    """SLOs for requests that carry no SLO headers (as :class:`~tropical_sched.core.slo.SloSpec`, in ms)."""

    ttft_slo_ms: PositiveFloat | None = None
    ttft_slo_scale: PositiveFloat | None = None
    tpot_slo_ms: PositiveFloat | None = None
    tpot_slo_scale: PositiveFloat | None = None

    def spec(self) -> SloSpec:
        """The equivalent :class:`SloSpec` (paper defaults where neither form is given)."""
        return SloSpec.make(
            ttft_slo_s=self.ttft_slo_ms / 1e3 if self.ttft_slo_ms else None,
            ttft_slo_scale=self.ttft_slo_scale,
            tpot_slo_s=self.tpot_slo_ms / 1e3 if self.tpot_slo_ms else None,
            tpot_slo_scale=self.tpot_slo_scale,
        )

    @model_validator(mode="after")
    def _one_form_each(self) -> SloDefaults:
        try:
            self.spec()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


class CalibrationSettings(_Strict):
    """Online calibration of each instance's step-time model and P/D hop (see
    :mod:`tropical_sched.predictors.calibration`); the fields other than ``enabled`` are
    :class:`~tropical_sched.predictors.calibration.CalibrationConfig`'s.

    Attributes:
        enabled: learn from what the router observes and predict with it (the snapshots carry the calibrated
            model and hop; ``GET /v1/tropical/profile?instance=URL`` returns the calibrated profile).
    """

    enabled: bool = True
    half_life_samples: PositiveFloat = 500.0
    prior_weight: PositiveFloat = 0.05
    min_samples: Annotated[int, Field(ge=1)] = 10
    min_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05
    max_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 20.0
    outlier_threshold: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 6.0

    def config(self) -> CalibrationConfig:
        """The calibrators' configuration."""
        return CalibrationConfig(
            half_life_samples=self.half_life_samples,
            prior_weight=self.prior_weight,
            min_samples=self.min_samples,
            min_ratio=self.min_ratio,
            max_ratio=self.max_ratio,
            outlier_threshold=self.outlier_threshold,
        )


class RouterConfig(_Strict):
    """The router service's configuration.

    Attributes:
        policy: registered policy name.
        policy_options: options of the policy's config.
        profile: default latency profile (name or file).
        slo: default SLOs.
        instances: the engine instances, at least one.
        model: model name to put in upstream requests that name none.
        prompt_tokens: how the router counts a text prompt's tokens before routing: ``estimate`` (characters /
            ``chars_per_token``; token-id prompts are always exact) or ``tokenize`` (ask an instance's
            ``/tokenize``, one extra round trip).
        chars_per_token: characters per token for ``estimate``.
        health_interval_s: how often instances are probed on ``/health`` (down ones until they answer).
        metrics_interval_s: how often engine ``/metrics`` are read to correct the router's view (0 to disable).
        live_state_interval_s: how often each engine's live state (``GET /v1/tropical/state``,
            :class:`~tropical_sched.live_state.EngineLiveState`) is read, seconds; the router then decides from
            it (every router's requests, not only its own), which keeps several routers in front of the same
            engines consistent. 0 (the default): off, the router counts what it sent.
        max_waiting_requests: requests held at the router beyond this get HTTP 503.
        request_timeout_s: upstream read timeout, and the longest a request may wait at the router.
        max_retries: times a request that produced no token is retried on another instance after a failure.
        unavailable_grace_s: a request that can only wait for instances that are all down gets HTTP 503 after
            this long (a restarting instance has this long to come back).
        calibration: online calibration of each instance's step times and P/D hop (on by default).
        decision_log: append one JSON line per finished request to this file: its route, wait, workers, the
            policy's reason and predictions, and its measured TTFT and TPOT
            (:mod:`~tropical_sched.serve.decision_log`); ``None`` (the default): no log.
    """

    policy: str = "tropical"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    profile: str = "a100-llama2-70b-tp4"
    slo: SloDefaults = Field(default_factory=SloDefaults)
    instances: list[InstanceConfig] = Field(min_length=1)
    model: str | None = None
    prompt_tokens: Literal["estimate", "tokenize"] = "estimate"
    chars_per_token: PositiveFloat = 4.0
    health_interval_s: PositiveFloat = 1.0
    metrics_interval_s: Annotated[float, Field(ge=0)] = 2.0
    live_state_interval_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    max_waiting_requests: Annotated[int, Field(ge=1)] = 4096
    request_timeout_s: PositiveFloat = 600.0
    max_retries: Annotated[int, Field(ge=0)] = 2
    unavailable_grace_s: PositiveFloat = 5.0
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    decision_log: str | None = None

    @model_validator(mode="after")
    def _unique_engines(self) -> RouterConfig:
        # One engine listed twice would get twice its share of the requests and be counted as two workers.
        first_at: dict[tuple[str, int, str], int] = {}
        for index, instance in enumerate(self.instances):
            earlier = first_at.setdefault(engine_address(instance.url), index)
            if earlier != index:
                raise LocatedValueError(
                    ("instances", index, "url"),
                    instance.url,
                    f"the same engine as instances[{earlier}].url = {self.instances[earlier].url!r} (localhost, "
                    "127.0.0.1, ::1 and 0.0.0.0 are all this machine; a missing port is the scheme's default)",
                )
        return self


def load_router_config(path: str | Path) -> RouterConfig:
    """Load and validate a YAML (or JSON) router configuration.

    Raises:
        ClusterFileError: the file cannot be read, is not YAML, or breaks the schema (path, line and field named).
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterFileError(path, None, f"cannot read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line, message = _yaml_problem(exc)
        raise ClusterFileError(path, line, f"not valid YAML: {message}") from None
    if not isinstance(raw, dict):
        raise ClusterFileError(path, 1, "expected a mapping with at least 'instances'")
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as exc:
        loc, message = validation_message(exc.errors(), exc.error_count())  # type: ignore[arg-type]
        raise ClusterFileError(path, line_of(text, loc), message) from None


def _yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """The line and a one-line description of a YAML error (PyYAML's own text quotes the source over 5-8 lines)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return None, " ".join(str(exc).split())
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or "malformed"
    where = f" (column {mark.column + 1})" if mark else ""
    context = ""
    if exc.context:
        context_line = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        context = f", {exc.context}{context_line}"
    return (mark.line + 1 if mark else None), f"{problem}{where}{context}"
