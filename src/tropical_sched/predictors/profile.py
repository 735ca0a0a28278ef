"""The versioned latency-profile file: schema, loading (with path and line on errors), and bundled profiles.

A profile records where its numbers came from (model, hardware, tensor parallelism, engine and version, source
and licence), the raw step-time samples, the fitted step-time coefficients with their fit error, the range the
samples cover, the KV-cache capacity, and optionally what serving the engine adds (:class:`ServingOverheads`). The
simulator, the router and the engine adapters all load this file.

File format: JSON, ``schema_version`` 1 (see :class:`ProfileFile`; ``serving`` is optional, so files written before
it existed still load). Bundled profiles live in
``tropical_sched/data/profiles/<name>.json``; ``tropical list`` shows them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tropical_sched.core.errors import ProfileFormatError, UnknownNameError
from tropical_sched.core.locate import line_of, validation_message
from tropical_sched.predictors.step_time import (
    FEATURE_NAMES,
    StepTimeCoefficients,
    StepTimeModel,
    ValidRange,
    step_features,
)

__all__ = [
    "PROFILE_SCHEMA_VERSION",
    "EngineInfo",
    "FitReport",
    "HardwareInfo",
    "KvCacheInfo",
    "ModelInfo",
    "Profile",
    "ProfileFile",
    "ProfileMetadata",
    "ServingOverheads",
    "SourceInfo",
    "StepSample",
    "ValidRangeInfo",
    "bundled_profile_names",
    "calibrated_profile_file",
    "load_profile",
    "profile_from_json",
    "time_scaled",
    "write_profile_file",
]

PROFILE_SCHEMA_VERSION = 1

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    """The served model's shape, enough to size its KV cache and weights.

    Attributes:
        name: model name, e.g. ``meta-llama/Llama-2-70b-hf``.
        num_layers: transformer layers.
        num_kv_heads: key/value heads (GQA groups).
        head_dim: dimension of one head.
        num_params: parameter count.
        bytes_per_param: bytes per weight (2 for fp16/bf16).
        kv_bytes_per_element: bytes per KV-cache element (2 for fp16/bf16, 1 for fp8).
        max_model_len: longest sequence (prompt + output) the model serves, tokens.
    """

    name: str
    num_layers: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    num_params: PositiveFloat
    bytes_per_param: PositiveFloat = 2
    kv_bytes_per_element: PositiveFloat = 2
    max_model_len: PositiveInt

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of KV cache per token over the whole model: ``2 * layers * kv_heads * head_dim * bytes``."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_element

    @property
    def weight_bytes(self) -> float:
        """Bytes of model weights."""
        return self.num_params * self.bytes_per_param


class HardwareInfo(_Strict):
    """The GPU type a profile was measured on.

    Attributes:
        gpu_name: e.g. ``A100-SXM4-80GB``.
        gpu_memory_bytes: memory of one GPU, bytes.
        interconnect: GPU-to-GPU link within a node, e.g. ``NVLink3``.
        interconnect_bandwidth_bytes_per_s: that link's bandwidth per GPU and direction, bytes per second.
    """

    gpu_name: str
    gpu_memory_bytes: PositiveInt
    interconnect: str
    interconnect_bandwidth_bytes_per_s: PositiveFloat


class EngineInfo(_Strict):
    """The serving engine the profile was measured with."""

    name: str
    version: str


class SourceInfo(_Strict):
    """Provenance and licence of the measurements."""

    description: str
    url: str = ""
    commit: str = ""
    licence: str = ""
    citation: str = ""


class ProfileMetadata(_Strict):
    """Who, what and where.

    Attributes:
        name: the profile's short name, e.g. ``a100-llama2-70b-tp4``.
        model: the served model.
        hardware: the GPU type.
        tensor_parallel_size: GPUs per worker (one model instance).
        engine: engine and version.
        source: where the samples come from, with licence and citation.
        created_with: the tool and version that wrote the file.
        environment: what else shaped the measurement, for profiles measured by ``tropical-profile`` (device name
            and count, torch version, dtype, engine settings); empty for imported tables.
    """

    name: str
    model: ModelInfo
    hardware: HardwareInfo
    tensor_parallel_size: PositiveInt
    engine: EngineInfo
    source: SourceInfo
    created_with: str
    environment: dict[str, str] = Field(default_factory=dict)


class StepSample(_Strict):
    """One measured engine step.

    Attributes:
        step_time_s: measured time of the step, seconds, > 0.
        num_decode_seqs: decodes in the step.
        num_decode_context_tokens: sum of their context tokens.
        prefill_chunks: ``[num_prefix_tokens, num_chunk_tokens]`` per prefill chunk in the step.
        used_in_fit: whether the fit used this sample (see :attr:`FitReport.exclusion_note`).
        origin: where the sample comes from (file and row, or the formula it was evaluated from).
    """

    step_time_s: PositiveFloat
    num_decode_seqs: NonNegativeInt = 0
    num_decode_context_tokens: NonNegativeInt = 0
    prefill_chunks: tuple[tuple[NonNegativeInt, PositiveInt], ...] = ()
    used_in_fit: bool = True
    origin: str = ""

    @model_validator(mode="after")
    def _not_empty(self) -> StepSample:
        if self.num_decode_seqs == 0 and not self.prefill_chunks:
            raise ValueError("a sample needs num_decode_seqs > 0 or at least one prefill chunk")
        if self.num_decode_context_tokens < self.num_decode_seqs:
            raise ValueError(
                f"num_decode_context_tokens={self.num_decode_context_tokens} is below "
                f"num_decode_seqs={self.num_decode_seqs} (every decode has at least one context token)"
            )
        return self


class FitReport(_Strict):
    """The fitted step-time coefficients and how well they fit.

    Attributes:
        method: how the fit was made.
        coefficients: one value per name in :data:`~tropical_sched.predictors.step_time.FEATURE_NAMES`, seconds
            per unit.
        r2: coefficient of determination on the fitted samples.
        max_relative_error: largest ``|predicted - measured| / measured`` over the fitted samples.
        median_relative_error: median of the same.
        num_samples_fitted: samples used.
        num_samples_excluded: samples kept in the file but not used.
        exclusion_note: why samples were excluded.
    """

    method: str
    coefficients: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]]
    r2: float
    max_relative_error: Annotated[float, Field(ge=0)]
    median_relative_error: Annotated[float, Field(ge=0)]
    num_samples_fitted: PositiveInt
    num_samples_excluded: NonNegativeInt = 0
    exclusion_note: str = ""

    @model_validator(mode="after")
    def _all_coefficients(self) -> FitReport:
        if set(self.coefficients) != set(FEATURE_NAMES):
            missing = sorted(set(FEATURE_NAMES) - set(self.coefficients))
            extra = sorted(set(self.coefficients) - set(FEATURE_NAMES))
            raise ValueError(f"coefficients must be exactly {list(FEATURE_NAMES)}; missing {missing}, extra {extra}")
        return self


class ValidRangeInfo(_Strict):
    """The range the samples cover (see :class:`~tropical_sched.predictors.step_time.ValidRange`)."""

    max_num_prompt_tokens: PositiveInt
    max_num_batched_tokens: PositiveInt
    max_num_decode_seqs: PositiveInt
    max_decode_context_tokens_per_seq: PositiveInt


class KvCacheInfo(_Strict):
    """KV-cache capacity of one worker.

    Attributes:
        num_tokens: tokens the KV cache holds, over all GPUs of the worker.
        derivation: how the number was obtained (measured, or computed from memory and model size).
    """

    num_tokens: PositiveInt
    derivation: str


class ServingOverheads(_Strict):
    """What a served deployment adds to the engine's step times, seconds, all >= 0.

    The step-time model prices engine steps; behind an HTTP server and a router a request also pays per step, per
    streamed token and per request, and a P/D request pays the hop from its prefill instance to its decoding one
    (the KV transfer and a second HTTP round trip).

    Attributes:
        per_step_s: fixed cost added to every engine step (the server's loop, output processing).
        per_streamed_token_s: cost per token streamed to a client (detokenization, an SSE event).
        per_request_s: cost per request (HTTP, tokenization, scheduling it in).
        pd_hop_fixed_s: the P/D hop's fixed part, from the prefill's end to the decoding instance's first step.
        pd_hop_per_prompt_token_s: the hop's cost per prompt token (the KV cache moved).
        source: how the values were obtained (e.g. ``measured by tropical-profile --endpoint``, ``learned online by
            the router``).
    """

    per_step_s: NonNegativeSeconds = 0.0
    per_streamed_token_s: NonNegativeSeconds = 0.0
    per_request_s: NonNegativeSeconds = 0.0
    pd_hop_fixed_s: NonNegativeSeconds = 0.0
    pd_hop_per_prompt_token_s: NonNegativeSeconds = 0.0
    source: str

    def pd_hop_s(self, num_prompt_tokens: int) -> float:
        """The P/D hop of a prompt of ``num_prompt_tokens`` tokens, ``fixed + per_token * L``, seconds."""
        return self.pd_hop_fixed_s + self.pd_hop_per_prompt_token_s * num_prompt_tokens


NO_SERVING_OVERHEADS = ServingOverheads(source="none recorded in the profile")
"""What :attr:`Profile.serving` returns for a profile without a ``serving`` section: all zeros."""


class ProfileFile(_Strict):
    """A latency profile, as stored on disk (``schema_version`` 1).

    Attributes:
        serving: what serving adds to the step times (optional; absent in profiles of the engine alone).
    """

    schema_version: Literal[1]
    metadata: ProfileMetadata
    valid_range: ValidRangeInfo
    kv_cache: KvCacheInfo
    fit: FitReport
    samples: tuple[StepSample, ...] = Field(min_length=1)
    serving: ServingOverheads | None = None


def time_scaled(profile: ProfileFile, factor: float) -> ProfileFile:
    """The same profile on hardware ``1 / factor`` times as fast: every time (samples, coefficients and serving
    overheads) times ``factor``, name suffixed. For running fake engines faster than real time
    (``FakeEngine(time_scale=...)``) while the router predicts them correctly.

    Raises:
        ValueError: ``factor`` is not positive.
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    fit = profile.fit.model_copy(update={"coefficients": {k: v * factor for k, v in profile.fit.coefficients.items()}})
    samples = tuple(s.model_copy(update={"step_time_s": s.step_time_s * factor}) for s in profile.samples)
    metadata = profile.metadata.model_copy(update={"name": f"{profile.metadata.name}-x{factor:g}"})
    serving = profile.serving
    if serving is not None:
        serving = serving.model_copy(update={name: getattr(serving, name) * factor for name in _SERVING_TIME_FIELDS})
    return profile.model_copy(update={"fit": fit, "samples": samples, "metadata": metadata, "serving": serving})


_SERVING_TIME_FIELDS = (
    "per_step_s",
    "per_streamed_token_s",
    "per_request_s",
    "pd_hop_fixed_s",
    "pd_hop_per_prompt_token_s",
)


def calibrated_profile_file(
    base: ProfileFile,
    model: StepTimeModel,
    serving: ServingOverheads | None,
    note: str,
    *,
    num_observations: int = 0,
    recent: Sequence[tuple[float, float]] = (),
    method: str = "online calibration",
) -> ProfileFile:
    """A profile file whose coefficients are ``model``'s: a profile calibrated online, in the profile-file schema,
    so that ``tropical simulate --profile`` and the other tools load it like any profile.

    The samples stay those of ``base`` (the offline measurement the calibration started from, its prior); the fit
    section records the calibration instead of the offline fit: ``method`` with ``note`` and the base's own
    method, the number of online observations, and the errors of ``model`` on the recent ones.

    Args:
        base: the offline profile the calibration started from.
        model: the calibrated step-time model (its valid range is the base's).
        serving: the serving overheads to record (``None``: keep the base's).
        note: what was calibrated where, e.g. ``"router http://10.0.0.1:8000, 312 observations"``; recorded in the
            fit's method and in ``metadata.environment["calibration"]``.
        num_observations: observations the calibration used; 0 means none yet (``model`` is then the prior).
        recent: ``(predicted_s, observed_s)`` of ``model`` on recent observations (observed > 0), for the fit's
            R^2 and relative errors; empty: those of ``model`` on the base's samples.
        method: the calibration method, one line.

    Returns:
        The calibrated profile; ``metadata.name`` is the base's with ``-online`` appended.
    """
    coefficients = dict(zip(FEATURE_NAMES, model.coefficients.as_tuple(), strict=True))
    pairs = [(p, o) for p, o in recent if o > 0]
    if pairs:
        fitted = max(num_observations, len(pairs))
        exclusion = (
            f"the samples are {base.metadata.name}'s offline measurements (the calibration's prior); the "
            f"coefficients were learned online from {num_observations} observations, not stored here; the errors "
            f"are those on the last {len(pairs)} of them"
        )
    else:
        pairs = [(_predicted_s(model, s), s.step_time_s) for s in base.samples if s.used_in_fit]
        fitted = len(pairs)
        exclusion = (
            f"the coefficients were learned online from {num_observations} observations (not stored here); the "
            "errors are those on the offline samples below"
        )
    errors = sorted(abs(p - o) / o for p, o in pairs)
    observed = [o for _, o in pairs]
    mean = sum(observed) / len(observed)
    total = sum((o - mean) ** 2 for o in observed)
    r2 = 1.0 - sum((p - o) ** 2 for p, o in pairs) / total if total > 0 else 1.0
    fit = FitReport(
        method=f"{method} ({note}); prior: {base.fit.method}",
        coefficients=coefficients,
        r2=r2,
        max_relative_error=errors[-1],
        median_relative_error=statistics.median(errors),
        num_samples_fitted=fitted,
        num_samples_excluded=0,
        exclusion_note=exclusion,
    )
    environment = {**base.metadata.environment, "calibration": note}
    name = base.metadata.name if base.metadata.name.endswith("-online") else f"{base.metadata.name}-online"
    metadata = base.metadata.model_copy(update={"name": name, "environment": environment})
    return base.model_copy(
        update={"fit": fit, "metadata": metadata, "serving": serving if serving is not None else base.serving}
    )


def _predicted_s(model: StepTimeModel, sample: StepSample) -> float:
    features = step_features(sample.num_decode_seqs, sample.num_decode_context_tokens, sample.prefill_chunks)
    return sum(c * x for c, x in zip(model.coefficients.as_tuple(), features, strict=True))


class Profile:
    """A loaded profile: the file plus the step-time model built from its fitted coefficients.

    Args:
        file: the validated file content.
        path: where it was loaded from (for messages), if anywhere.
    """

    def __init__(self, file: ProfileFile, path: str | None = None) -> None:
        self.file = file
        self.path = path

    @property
    def name(self) -> str:
        """The profile's short name."""
        return self.file.metadata.name

    @property
    def metadata(self) -> ProfileMetadata:
        """Model, hardware, TP, engine and source."""
        return self.file.metadata

    @cached_property
    def step_time(self) -> StepTimeModel:
        """The step-time model with this profile's coefficients and valid range."""
        vr = self.file.valid_range
        return StepTimeModel(
            StepTimeCoefficients(**self.file.fit.coefficients),
            ValidRange(
                max_num_prompt_tokens=vr.max_num_prompt_tokens,
                max_num_batched_tokens=vr.max_num_batched_tokens,
                max_num_decode_seqs=vr.max_num_decode_seqs,
                max_decode_context_tokens_per_seq=vr.max_decode_context_tokens_per_seq,
            ),
            name=self.name,
        )

    @property
    def serving(self) -> ServingOverheads:
        """What serving adds to the step times (all zeros when the file records none)."""
        return self.file.serving if self.file.serving is not None else NO_SERVING_OVERHEADS

    @property
    def num_kv_cache_tokens(self) -> int:
        """KV-cache capacity of one worker, tokens."""
        return self.file.kv_cache.num_tokens

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token over the whole model."""
        return self.file.metadata.model.kv_bytes_per_token

    @property
    def max_model_len(self) -> int:
        """Longest sequence the model serves, tokens."""
        return self.file.metadata.model.max_model_len

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs per worker."""
        return self.file.metadata.tensor_parallel_size

    @property
    def default_kv_link_bandwidth_bytes_per_s(self) -> float:
        """Bandwidth for a worker-to-worker KV transfer within a node: every GPU of the worker sends its shard
        over its own link, so ``tensor_parallel_size * interconnect_bandwidth_bytes_per_s``."""
        hardware = self.file.metadata.hardware
        return self.tensor_parallel_size * hardware.interconnect_bandwidth_bytes_per_s

    def describe(self) -> str:
        """One line: model, GPUs, engine and fit error."""
        m = self.file.metadata
        fit = self.file.fit
        return (
            f"{m.model.name} on {m.tensor_parallel_size}x {m.hardware.gpu_name} ({m.engine.name} {m.engine.version}); "
            f"fit R^2 {fit.r2:.3f}, max rel. error {fit.max_relative_error:.1%}"
        )


# -- loading ----------------------------------------------------------------------------------------------------


def _bundled_dir() -> Any:
    return resources.files("tropical_sched") / "data" / "profiles"


def bundled_profile_names() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    return sorted(p.name[: -len(".json")] for p in _bundled_dir().iterdir() if p.name.endswith(".json"))


def _parse_profile(text: str, path: str) -> ProfileFile:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileFormatError(path, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, PROFILE_SCHEMA_VERSION):
        raise ProfileFormatError(
            path,
            line_of(text, ["schema_version"]),
            f"schema_version {raw.get('schema_version')!r} is not supported (this version reads "
            f"{PROFILE_SCHEMA_VERSION}); re-create the profile with tropical-profile",
        )
    try:
        profile = ProfileFile.model_validate(raw)
    except ValidationError as exc:
        loc, message = validation_message(exc.errors(), exc.error_count())  # type: ignore[arg-type]
        raise ProfileFormatError(path, line_of(text, loc), message) from None
    problem = _physical_problem(profile)
    if problem is not None:
        loc, message = problem
        raise ProfileFormatError(path, line_of(text, loc), message)
    return profile


# The coefficients that price the smallest step of each kind: a 1-token prefill alone, one decode of a 1-token context.
_PREFILL_STEP_TERMS = ("const_s", "per_batched_token_s", "per_prefill_seq_s", "per_prefill_attention_pair_s")
_DECODE_STEP_TERMS = ("const_s", "per_batched_token_s", "per_decode_seq_s", "per_decode_context_token_s")


def _physical_problem(profile: ProfileFile) -> tuple[list[str | int], str] | None:
    """What makes a schema-valid profile describe no real engine, as ``(loc, message)``; ``None`` if nothing.

    The schema already refuses negative coefficients, a zero KV capacity and non-positive sample times. Left: a fit
    in which some step costs nothing. With non-negative coefficients the smallest step of each kind is the cheapest,
    so it is enough that it takes time; otherwise SLOs given as multiples of the isolated prefill or decode step
    come out as 0 s and fail far from the file.
    """
    coefficients = profile.fit.coefficients
    for kind, terms in (("prefill", _PREFILL_STEP_TERMS), ("decode", _DECODE_STEP_TERMS)):
        if sum(coefficients[name] for name in terms) <= 0:
            return ["fit", "coefficients"], (
                f"field fit.coefficients: {', '.join(terms)} are all 0, so a {kind} step would take no time; "
                "re-fit the profile from its samples (tropical-profile)"
            )
    return None


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a bundled profile by name, or a profile file by path.

    Args:
        name_or_path: a name from :func:`bundled_profile_names`, or a path to a profile JSON file.

    Returns:
        The loaded profile.

    Raises:
        ProfileFormatError: the file is not valid JSON or breaks the schema (message gives path and line).
        UnknownNameError: neither a bundled name nor an existing file.
    """
    text_name = str(name_or_path)
    if text_name in bundled_profile_names():
        resource = _bundled_dir() / f"{text_name}.json"
        return Profile(_parse_profile(resource.read_text(encoding="utf-8"), f"<bundled>/{text_name}.json"), text_name)
    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileFormatError(str(path), None, f"cannot read: {exc}") from None
        return Profile(_parse_profile(text, str(path)), str(path))
    if path.suffix or path.parent != Path("."):
        raise UnknownNameError("profile", str(path), bundled_profile_names(), is_path=True)
    raise UnknownNameError("profile", text_name, bundled_profile_names())


def write_profile_file(profile: ProfileFile, path: str | Path) -> None:
    """Write a profile as JSON with one sample per line (diff-friendly; errors point at the sample's line)."""
    data = profile.model_dump(mode="json")
    if not data["metadata"]["environment"]:
        del data["metadata"]["environment"]  # imported tables have none; keeps their files as they were
    if data.get("serving") is None:
        data.pop("serving", None)  # optional section; files without it stay as they were
    samples = data.pop("samples")
    head = json.dumps(data, indent=2)
    sample_lines = ",\n".join("    " + json.dumps(s, separators=(", ", ": ")) for s in samples)
    text = head[:-2] + ',\n  "samples": [\n' + sample_lines + "\n  ]\n}\n"
    Path(path).write_text(text, encoding="utf-8")


def profile_from_json(text: str, source: str) -> Profile:
    """A profile from the text of a profile file that did not come from disk (e.g. a router's
    ``GET /v1/tropical/profile``).

    Args:
        text: the profile file's JSON.
        source: where it came from (a URL), named in errors.

    Raises:
        ProfileFormatError: the text is not a valid profile (``source`` and line named).
    """
    return Profile(_parse_profile(text, source), path=source)
