"""Profiles from NVIDIA AIConfigurator's measured kernel tables (``tropical-profile import aiconfigurator``).

AIConfigurator (``aiconfigurator-core`` on PyPI, Apache-2.0; the estimator behind NVIDIA Dynamo's planner) composes
engine-step latencies from per-kernel tables measured on real GPUs (GEMM, attention, communication) for vLLM,
SGLang and TensorRT-LLM. This module samples its estimator over the profiler's grid, the same kinds of steps a
``tropical-profile vllm`` sweep measures, and fits the step-time model (:mod:`tropical_sched.predictors.step_time`):

* prefills alone, 16 tokens up to the model's context: ``predict_prefill_latency(1, L, 0)``;
* prefill chunks at prefix positions up to the context: ``predict_prefill_latency(1, P + c, P)``;
* decode-only steps, batch ``B`` x context ``C`` per sequence while ``B * C`` fits the KV cache:
  ``decode_step_latency(B, isl, osl=2)``, whose sequences attend to ``isl + osl // 2 + 1`` tokens;
* mixed steps, one whole prompt of ``L`` tokens with ``B`` decodes at ``L + 2`` tokens of context:
  ``mixed_step_latency(L, B, L, 2, 0)``.

The KV capacity is AIConfigurator's own memory estimate (weights, activations, runtime and NCCL overheads) at
vLLM's and SGLang's ``gpu_memory_utilization``-style budget (a fraction of total memory). Every sample records the
call that produced it, so a profile can be checked against the estimator. ``aiconfigurator-core`` is an optional
extra: ``pip install 'tropical-sched[aiconfigurator]'``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tropical_sched._version import __version__
from tropical_sched.core.errors import ConfigError, ProfileFormatError
from tropical_sched.predictors.fitting import fit_step_time
from tropical_sched.predictors.importers import valid_range_of
from tropical_sched.predictors.profile import (
    EngineInfo,
    HardwareInfo,
    KvCacheInfo,
    ModelInfo,
    Profile,
    ProfileFile,
    ProfileMetadata,
    SourceInfo,
    StepSample,
)

__all__ = [
    "CONTEXT_BANDS",
    "BandError",
    "fit_error_by_context_band",
    "import_aiconfigurator",
    "sample_context_tokens",
]

_GIB = 1 << 30
_DECODE_OSL = 2  # decode_step_latency's sequences attend to isl + osl // 2 + 1 tokens
_PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)
_PREFILL_LENGTHS += (49152, 65536, 98304, 131072)
_CHUNK_TOKENS = (256, 512, 1024, 2048, 4096, 8192)
_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_DECODE_CONTEXTS = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_MIXED_PROMPTS = (256, 512, 1024, 2048, 4096, 8192)
_MIXED_BATCHES = (1, 8, 32, 128)
_MAX_NUM_BATCHED_TOKENS = 8192  # the activation budget AIConfigurator sizes memory with (vLLM's default chunk size)

CONTEXT_BANDS: tuple[tuple[int, int], ...] = ((0, 4096), (4096, 32768), (32768, 1 << 62))
"""Context bands (tokens, lower bound exclusive) for :func:`fit_error_by_context_band`: up to 4K (Llama-2's
context), 4K-32K, beyond 32K."""

SOURCE = SourceInfo(
    description=(
        "NVIDIA AIConfigurator (aiconfigurator-core): engine-step latencies composed from per-kernel tables "
        "(GEMM, attention, NCCL) measured on the named GPU for the named engine version; samples are the "
        "estimator's answers on a grid, each naming its call"
    ),
    url="https://github.com/ai-dynamo/aiconfigurator",
    licence="Apache-2.0 (Copyright (c) 2025-2026 NVIDIA CORPORATION & AFFILIATES)",
    citation="NVIDIA AIConfigurator, https://github.com/ai-dynamo/aiconfigurator (aiconfigurator-core on PyPI)",
)


def _require_aiconfigurator() -> Any:
    try:
        import aiconfigurator_core
    except ImportError:
        raise ConfigError(
            "import aiconfigurator needs aiconfigurator-core: pip install 'tropical-sched[aiconfigurator]'"
        ) from None
    return aiconfigurator_core


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """AIConfigurator logs and prints its database loading (dozens of lines per system); keep the CLI's output
    to what the import did."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _hf_config(model: str, package_dir: Path) -> tuple[dict[str, Any], str]:
    """The model's Hugging Face config: a local ``config.json`` (or its directory), else AIConfigurator's copy."""
    local = Path(model)
    candidates = [local / "config.json", local] if local.exists() else []
    candidates.append(package_dir / "model_configs" / f"{model.replace('/', '--')}_config.json")
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")), str(path)
            except json.JSONDecodeError as exc:
                raise ProfileFormatError(str(path), exc.lineno, f"not valid JSON: {exc.msg}") from None
    known = sorted(
        p.name.removesuffix("_config.json").replace("--", "/") for p in (package_dir / "model_configs").glob("*.json")
    )
    shown = ", ".join(k for k in known if not k.endswith("hf_quant"))
    raise ConfigError(f"--model {model!r}: no config.json there and not a model AIConfigurator knows ({shown})")


def _model_info(model: str, config: dict[str, Any], config_path: str, max_model_len: int | None) -> ModelInfo:
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads", heads))
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        context = int(config["max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileFormatError(config_path, None, f"not a dense decoder config: {exc!r}") from None
    if "num_experts" in config or "num_local_experts" in config or "n_routed_experts" in config:
        raise ConfigError(
            f"--model {model!r} is a mixture of experts; the step-time model prices dense models only (a MoE "
            "step's time depends on expert routing, not on the features it fits)"
        )
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q and o, then k and v
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    num_params = layers * (attention + mlp + 2 * hidden) + embeddings + hidden
    if max_model_len is not None and max_model_len > context:
        raise ConfigError(f"--max-model-len {max_model_len} exceeds the model's context ({context} tokens)")
    return ModelInfo(
        name=model,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_params=float(num_params),
        max_model_len=max_model_len or context,
    )


def _hardware(package_dir: Path, system: str) -> HardwareInfo:
    import yaml  # AIConfigurator depends on PyYAML

    path = package_dir / "systems" / f"{system}.yaml"
    if not path.is_file():
        systems = package_dir / "systems"
        known = sorted(p.stem for p in systems.glob("*.yaml") if (systems / "data" / p.stem).is_dir())
        raise ConfigError(f"--system {system!r} is not an AIConfigurator system ({', '.join(known)})")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    memory_bytes = int(spec["gpu"]["mem_capacity"])
    return HardwareInfo(
        gpu_name=f"{system.upper().replace('_', '-')}-{round(memory_bytes / _GIB)}GB",
        gpu_memory_bytes=memory_bytes,
        interconnect="NVLink (AIConfigurator intra_node_bw)",
        interconnect_bandwidth_bytes_per_s=float(spec["node"]["intra_node_bw"]),
    )


def sample_context_tokens(sample: StepSample) -> int:
    """The longest context a sample's step attends to: a chunk's prefix plus chunk, or a decode's mean context."""
    longest = max((p + c for p, c in sample.prefill_chunks), default=0)
    if sample.num_decode_seqs:
        longest = max(longest, math.ceil(sample.num_decode_context_tokens / sample.num_decode_seqs))
    return longest


@dataclass(frozen=True)
class BandError:
    """The step-time fit's relative error on the samples of one context band.

    Attributes:
        lower_tokens, upper_tokens: the band, ``lower < context <= upper`` tokens.
        num_samples: samples in the band.
        median_relative_error, max_relative_error: ``|predicted - sample| / sample`` over them.
    """

    lower_tokens: int
    upper_tokens: int
    num_samples: int
    median_relative_error: float
    max_relative_error: float


def fit_error_by_context_band(
    profile: ProfileFile, bands: Sequence[tuple[int, int]] = CONTEXT_BANDS
) -> list[BandError]:
    """The fit's median and max relative error per context band (:func:`sample_context_tokens`), fitted samples
    only; empty bands are left out."""
    model = Profile(profile).step_time
    out = []
    for lower, upper in bands:
        errors = sorted(
            abs(
                model.step_time_s(
                    num_decode_seqs=s.num_decode_seqs,
                    num_decode_context_tokens=s.num_decode_context_tokens,
                    prefill_chunks=s.prefill_chunks,
                )
                - s.step_time_s
            )
            / s.step_time_s
            for s in profile.samples
            if s.used_in_fit and lower < sample_context_tokens(s) <= upper
        )
        if errors:
            middle = len(errors) // 2
            median = errors[middle] if len(errors) % 2 else (errors[middle - 1] + errors[middle]) / 2
            out.append(BandError(lower, upper, len(errors), median, errors[-1]))
    return out


def _geometric_lengths(base: Sequence[int], max_tokens: int) -> list[int]:
    """``base``, then doubling past its end, up to ``max_tokens`` (which is included)."""
    lengths = [n for n in base if n < max_tokens]
    n = base[-1] * 2
    while n < max_tokens:
        lengths.append(n)
        n *= 2
    return [*lengths, max_tokens]


def import_aiconfigurator(
    model: str,
    *,
    system: str,
    backend: str,
    tensor_parallel_size: int = 1,
    backend_version: str | None = None,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    name: str | None = None,
) -> ProfileFile:
    """Build a profile from AIConfigurator's estimator (the module docstring has the grid).

    Args:
        model: a Hugging Face id AIConfigurator ships a config for (``meta-llama/Meta-Llama-3.1-70B``,
            ``Qwen/Qwen3-32B``), or a local ``config.json`` or checkpoint directory. Dense models only.
        system: AIConfigurator system name (``a100_sxm``, ``h100_sxm``, ``h200_sxm``, ``b200_sxm``, ...).
        backend: ``vllm`` or ``sglang``.
        tensor_parallel_size: GPUs per worker, >= 1.
        backend_version: engine version of the tables; default AIConfigurator's current one for the system.
        max_model_len: longest sequence to profile and serve, tokens; default the model's context.
        gpu_memory_utilization: fraction of total GPU memory the engine may use, in (0, 1].
        name: the profile's name; default ``<gpu>-<model>-tp<N>[-<backend>]``.

    Returns:
        The profile; its ``fit`` reports the error against the estimator's own samples.

    Raises:
        ConfigError: aiconfigurator-core is missing, or the model, system, backend or version is unknown to it.
        ProfileFormatError: the model's config cannot be read (path given).
    """
    package = _require_aiconfigurator()
    if backend not in ("vllm", "sglang"):
        raise ConfigError(f"--backend must be vllm or sglang, got {backend!r}")
    if tensor_parallel_size < 1:
        raise ConfigError(f"--tp must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    package_dir = Path(package.__file__).parent
    config, config_path = _hf_config(model, package_dir)
    model_info = _model_info(model, config, config_path, max_model_len)
    hardware = _hardware(package_dir, system)
    from aiconfigurator_core.sdk import perf_database
    from aiconfigurator_core.sdk.engine import EngineHandle
    from aiconfigurator_core.sdk.memory import estimate_kv_cache

    with _quiet():
        try:
            version = perf_database.resolve_query_version(system, backend, backend_version or "current")
            engine = EngineHandle.compile(model, system, backend, backend_version=version, tp_size=tensor_parallel_size)
            kv = estimate_kv_cache(
                model,
                system,
                backend,
                version,
                max_num_tokens=_MAX_NUM_BATCHED_TOKENS,
                max_batch_size=max(_DECODE_BATCHES),
                memory_fraction_kind="of_total",
                memory_fraction_value=gpu_memory_utilization,
                tp_size=tensor_parallel_size,
            )
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise ConfigError(
                f"AIConfigurator cannot estimate {model} on {system} with {backend} "
                f"{backend_version or 'current'} at TP{tensor_parallel_size}: {exc}"
            ) from None
    num_kv_tokens = int(kv["total_kv_size_tokens"])
    context = model_info.max_model_len
    samples: list[StepSample] = []

    def add(step_ms: float, origin: str, **fields: Any) -> None:
        if not (math.isfinite(step_ms) and step_ms > 0):
            raise ConfigError(f"AIConfigurator answered {step_ms!r} ms for {origin}")
        samples.append(StepSample(step_time_s=step_ms / 1e3, origin=f"AIConfigurator {origin}", **fields))

    with _quiet():
        for length in _geometric_lengths(_PREFILL_LENGTHS, context):
            add(
                engine.predict_prefill_latency(1, length, 0),
                f"predict_prefill_latency(bs=1, isl={length}, prefix=0)",
                prefill_chunks=((0, length),),
            )
        prefixes = _geometric_lengths((1024, 4096, 16384), context)
        for chunk in _CHUNK_TOKENS:
            for prefix in prefixes:
                if prefix + chunk <= context:
                    add(
                        engine.predict_prefill_latency(1, prefix + chunk, prefix),
                        f"predict_prefill_latency(bs=1, isl={prefix + chunk}, prefix={prefix})",
                        prefill_chunks=((prefix, chunk),),
                    )
        attended = _DECODE_OSL // 2 + 1
        for batch in _DECODE_BATCHES:
            for per_seq in _geometric_lengths(_DECODE_CONTEXTS, context):
                if batch * per_seq > num_kv_tokens:
                    break
                isl = per_seq - attended
                add(
                    engine.decode_step_latency(batch, isl, _DECODE_OSL),
                    f"decode_step_latency(gen_tokens={batch}, isl={isl}, osl={_DECODE_OSL})",
                    num_decode_seqs=batch,
                    num_decode_context_tokens=batch * per_seq,
                )
        for prompt in _MIXED_PROMPTS:
            for batch in _MIXED_BATCHES:
                if prompt + attended <= context and batch * (prompt + attended) <= num_kv_tokens:
                    add(
                        engine.mixed_step_latency(prompt, batch, prompt, _DECODE_OSL, 0),
                        f"mixed_step_latency(ctx_tokens={prompt}, gen_tokens={batch}, isl={prompt}, "
                        f"osl={_DECODE_OSL}, prefix=0)",
                        num_decode_seqs=batch,
                        num_decode_context_tokens=batch * (prompt + attended),
                        prefill_chunks=((0, prompt),),
                    )
    fit = fit_step_time(samples)
    try:
        package_version = metadata.version("aiconfigurator-core")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported, so installed
        package_version = "unknown"
    gpu = system.split("_")[0]
    short_model = model.rstrip("/").split("/")[-1].lower().replace("meta-llama-", "llama")
    default_name = f"{gpu}-{short_model}-tp{tensor_parallel_size}" + ("-sglang" if backend == "sglang" else "")
    return ProfileFile(
        schema_version=1,
        metadata=ProfileMetadata(
            name=name or default_name,
            model=model_info,
            hardware=hardware,
            tensor_parallel_size=tensor_parallel_size,
            engine=EngineInfo(name=backend, version=f"{version} (AIConfigurator tables)"),
            source=SOURCE.model_copy(update={"commit": f"aiconfigurator-core {package_version} (PyPI)"}),
            created_with=f"tropical-sched {__version__} import_aiconfigurator",
            environment={
                "aiconfigurator_core": package_version,
                "system": system,
                "backend": backend,
                "backend_version": str(version),
                "model_config": Path(config_path).name,
            },
        ),
        valid_range=valid_range_of(samples),
        kv_cache=KvCacheInfo(
            num_tokens=num_kv_tokens,
            derivation=(
                f"AIConfigurator estimate_kv_cache ({kv['source']}): {gpu_memory_utilization} of "
                f"{int(kv['total_gpu_capacity_bytes']) / _GIB:.0f} GiB per GPU, less weights, activations at "
                f"{_MAX_NUM_BATCHED_TOKENS} batched tokens, runtime and NCCL overheads; "
                f"{int(kv['kv_size_per_token_bytes'])} KV bytes per token per GPU"
            ),
        ),
        fit=fit,
        samples=tuple(samples),
    )
