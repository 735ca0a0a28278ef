"""Turn published latency tables into tropical-sched profiles.

Each importer reads an upstream file as published (no edits), turns its rows into :class:`StepSample` records that
keep their origin, fits the step-time model, and returns a :class:`ProfileFile`. The bundled profiles are built
with these functions (``scripts/build_bundled_data.py``), so ``tropical-profile import`` reproduces them.

Supported sources:

* splitwise-sim ``data/perf_model.csv`` (Patel et al., "Splitwise", ISCA 2024; MIT): whole-iteration
  ``prompt_time`` and ``token_time`` in ms measured on DGX-A100 / DGX-H100 for Llama-2-70B and BLOOM-176B.
* DistServe ``profiler-a100-80g.{vllm,distserve}.json`` (Zhong et al., "DistServe", OSDI 2024; Apache-2.0):
  coefficients (ms) of fitted prefill and decode latency formulas, plus ``max_num_tokens.csv`` (KV capacity).
  Only the fitted formulas are published, so samples are the formulas evaluated on a grid and say so.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tropical_sched._version import __version__
from tropical_sched.core.errors import ConfigError, ProfileFormatError, UnknownNameError
from tropical_sched.predictors.fitting import fit_step_time
from tropical_sched.predictors.profile import (
    EngineInfo,
    HardwareInfo,
    KvCacheInfo,
    ModelInfo,
    ProfileFile,
    ProfileMetadata,
    SourceInfo,
    StepSample,
    ValidRangeInfo,
)

__all__ = [
    "KNOWN_GPUS",
    "KNOWN_MODELS",
    "derive_kv_cache_tokens",
    "import_distserve",
    "import_splitwise",
    "valid_range_of",
]

_GIB = 1 << 30

KNOWN_MODELS: dict[str, ModelInfo] = {
    # Shapes from the models' Hugging Face configs.
    "llama2-70b": ModelInfo(
        name="meta-llama/Llama-2-70b-hf",
        num_layers=80,
        num_kv_heads=8,
        head_dim=128,
        num_params=68.98e9,
        max_model_len=4096,
    ),
    "opt-13b": ModelInfo(
        name="facebook/opt-13b", num_layers=40, num_kv_heads=40, head_dim=128, num_params=12.85e9, max_model_len=2048
    ),
    "opt-66b": ModelInfo(
        name="facebook/opt-66b", num_layers=64, num_kv_heads=72, head_dim=128, num_params=65.7e9, max_model_len=2048
    ),
}
"""Model shapes the importers know, keyed by the upstream tables' model names."""

KNOWN_GPUS: dict[str, HardwareInfo] = {
    # NVLink bandwidth per GPU and direction: A100 NVLink3 600 GB/s and H100 NVLink4 900 GB/s bidirectional.
    "a100-80gb": HardwareInfo(
        gpu_name="A100-SXM4-80GB",
        gpu_memory_bytes=80 * _GIB,
        interconnect="NVLink3",
        interconnect_bandwidth_bytes_per_s=300e9,
    ),
    "h100-80gb": HardwareInfo(
        gpu_name="H100-SXM5-80GB",
        gpu_memory_bytes=80 * _GIB,
        interconnect="NVLink4",
        interconnect_bandwidth_bytes_per_s=450e9,
    ),
}
"""GPU types the importers know, keyed by the upstream tables' hardware names."""

_SPLITWISE_SOURCE = SourceInfo(
    description=(
        "splitwise-sim data/perf_model.csv: whole-iteration prompt_time and token_time (ms) measured on real "
        "DGX machines (5 repeats per point)"
    ),
    url="https://github.com/Mutinifni/splitwise-sim",
    commit="8f99e7dc9b407f4ce2488d03dd44c0b8b946dab0",
    licence="MIT (Copyright (c) 2024 Pratyush Patel)",
    citation=(
        "P. Patel, E. Choukse, C. Zhang, A. Shah, I. Goiri, S. Maleki, R. Bianchini. Splitwise: Efficient "
        "generative LLM inference using phase splitting. ISCA 2024."
    ),
)

_DISTSERVE_SOURCE = SourceInfo(
    description=(
        "DistServe simdistserve/estimators/profile_data: fitted prefill/decode latency coefficients (ms) from "
        "A100-80GB profiling, and max_num_tokens.csv (KV capacity); samples are the published formulas evaluated "
        "on a grid"
    ),
    url="https://github.com/LLMServe/DistServe",
    commit="82831f1604cc6b10bebd360f6c437a07790dde9f",
    licence="Apache-2.0",
    citation=(
        "Y. Zhong, S. Liu, J. Chen, J. Hu, Y. Zhu, X. Liu, X. Jin, H. Zhang. DistServe: Disaggregating prefill "
        "and decoding for goodput-optimized large language model serving. OSDI 2024."
    ),
)


def derive_kv_cache_tokens(
    model: ModelInfo, hardware: HardwareInfo, tensor_parallel_size: int, gpu_memory_utilization: float = 0.9
) -> int:
    """KV-cache tokens of one worker as vLLM sizes it: the memory left after the weights.

    ``floor((utilization * tp * gpu_memory - weight_bytes) / kv_bytes_per_token)``; activation memory is ignored
    (a few GB, a small overestimate).

    Raises:
        ConfigError: the weights do not fit in the memory given.
    """
    free_bytes = gpu_memory_utilization * tensor_parallel_size * hardware.gpu_memory_bytes - model.weight_bytes
    if free_bytes <= model.kv_bytes_per_token:
        raise ConfigError(
            f"{model.name} ({model.weight_bytes / _GIB:.0f} GiB of weights) does not fit on "
            f"tensor_parallel_size={tensor_parallel_size} x {hardware.gpu_name}"
        )
    return int(free_bytes // model.kv_bytes_per_token)


def valid_range_of(samples: Sequence[StepSample]) -> ValidRangeInfo:
    """The range covered by the samples used in the fit."""
    used = [s for s in samples if s.used_in_fit]
    prompt = [p + c for s in used for p, c in s.prefill_chunks] or [1]
    batched = [s.num_decode_seqs + sum(c for _, c in s.prefill_chunks) for s in used]
    decode_seqs = [s.num_decode_seqs for s in used if s.num_decode_seqs] or [1]
    context = [math.ceil(s.num_decode_context_tokens / s.num_decode_seqs) for s in used if s.num_decode_seqs] or [1]
    return ValidRangeInfo(
        max_num_prompt_tokens=max(prompt),
        max_num_batched_tokens=max(batched),
        max_num_decode_seqs=max(decode_seqs),
        max_decode_context_tokens_per_seq=max(context),
    )


def _model_and_gpu(model: str, hardware: str) -> tuple[ModelInfo, HardwareInfo]:
    if model not in KNOWN_MODELS:
        raise UnknownNameError("model", model, list(KNOWN_MODELS))
    if hardware not in KNOWN_GPUS:
        raise UnknownNameError("hardware", hardware, list(KNOWN_GPUS))
    return KNOWN_MODELS[model], KNOWN_GPUS[hardware]


def import_splitwise(
    csv_path: str | Path,
    *,
    model: str,
    hardware: str,
    tensor_parallel_size: int,
    name: str | None = None,
    gpu_memory_utilization: float = 0.9,
) -> ProfileFile:
    """Build a profile from splitwise-sim's ``perf_model.csv``.

    Every row gives two samples: its ``prompt_time`` (one prefill step of ``batch_size`` prompts of
    ``prompt_size`` tokens) and its ``token_time`` (the mean decode step of ``batch_size`` requests generating
    ``token_size`` tokens after a ``prompt_size``-token prompt, so a mean context of
    ``prompt_size + (token_size + 1) / 2``). Batched prefills (``batch_size`` > 1) are kept but not fitted: they
    grow faster than linearly in the batch (16 x 512 tokens took longer than one 8192-token prompt), unlike any
    engine that batches prefill tokens, which suggests they were not run as one batched step.

    Args:
        csv_path: path to ``perf_model.csv``.
        model: upstream model name (``llama2-70b``).
        hardware: upstream hardware name (``a100-80gb`` or ``h100-80gb``).
        tensor_parallel_size: the TP degree to select (2, 4 or 8).
        name: the profile's name; default ``<gpu>-<model>-tp<N>``.
        gpu_memory_utilization: fraction of GPU memory vLLM may use, for the KV capacity.

    Raises:
        ProfileFormatError: the CSV lacks a column or has a malformed number (path and line given).
        ConfigError: no row matches the selection.
    """
    model_info, gpu = _model_and_gpu(model, hardware)
    path = str(csv_path)
    samples: list[StepSample] = []
    required = (
        "model",
        "hardware",
        "prompt_size",
        "batch_size",
        "token_size",
        "prompt_time",
        "token_time",
        "tensor_parallel",
    )
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ProfileFormatError(path, 1, f"missing column(s) {', '.join(missing)}")
        for row in reader:
            line = reader.line_num
            if row["model"] != model or row["hardware"] != hardware:
                continue
            try:
                if int(row["tensor_parallel"]) != tensor_parallel_size:
                    continue
                prompt, batch, tokens = int(row["prompt_size"]), int(row["batch_size"]), int(row["token_size"])
                prompt_s, token_s = float(row["prompt_time"]) / 1e3, float(row["token_time"]) / 1e3
            except ValueError as exc:
                raise ProfileFormatError(path, line, f"malformed number: {exc}") from None
            samples.append(
                StepSample(
                    step_time_s=prompt_s,
                    prefill_chunks=tuple((0, prompt) for _ in range(batch)),
                    used_in_fit=batch == 1,
                    origin=f"perf_model.csv line {line} prompt_time",
                )
            )
            samples.append(
                StepSample(
                    step_time_s=token_s,
                    num_decode_seqs=batch,
                    num_decode_context_tokens=round(batch * (prompt + (tokens + 1) / 2)),
                    origin=f"perf_model.csv line {line} token_time",
                )
            )
    if not samples:
        raise ConfigError(
            f"{path}: no rows for model={model!r}, hardware={hardware!r}, tensor_parallel={tensor_parallel_size}"
        )
    fit = fit_step_time(
        samples,
        exclusion_note=(
            "batched prefills (batch_size > 1) excluded: their time grows faster than linearly in the batch, "
            "unlike a batched prefill step; kept for reference"
        ),
    )
    profile_name = name or f"{hardware.split('-')[0]}-{model}-tp{tensor_parallel_size}"
    return ProfileFile(
        schema_version=1,
        metadata=ProfileMetadata(
            name=profile_name,
            model=model_info,
            hardware=gpu,
            tensor_parallel_size=tensor_parallel_size,
            engine=EngineInfo(name="vllm", version="splitwise-sim measurements (vLLM-like engine, 2023)"),
            source=_SPLITWISE_SOURCE,
            created_with=f"tropical-sched {__version__} import_splitwise",
        ),
        valid_range=valid_range_of(samples),
        kv_cache=KvCacheInfo(
            num_tokens=derive_kv_cache_tokens(model_info, gpu, tensor_parallel_size, gpu_memory_utilization),
            derivation=(
                f"computed: ({gpu_memory_utilization} x {tensor_parallel_size} x GPU memory - weights) / "
                f"{model_info.kv_bytes_per_token:.0f} KV bytes per token"
            ),
        ),
        fit=fit,
        samples=tuple(samples),
    )


def _distserve_prefill_s(coeffs: Sequence[float], prompt_lengths: Sequence[int]) -> float:
    a, b, c = coeffs
    return (a + b * sum(prompt_lengths) + c * sum(n * n for n in prompt_lengths)) / 1e3


def _distserve_decode_s(entry: dict[str, Any], batch: int, context_tokens: int) -> float:
    key = "decoding_smallbs" if batch < entry["decoding_large_small_bs_threshold"] else "decoding_largebs"
    a, b, c = (float(v) for v in entry[key])
    return (a + b * context_tokens + c * batch) / 1e3


def import_distserve(
    coefficients_json: str | Path,
    capacity_csv: str | Path,
    *,
    model: str,
    tensor_parallel_size: int,
    engine: str = "vllm",
    name: str | None = None,
) -> ProfileFile:
    """Build a profile from DistServe's fitted latency coefficients and KV-capacity table.

    DistServe publishes only fitted formulas (ms): prefill ``a + b * sum(L) + c * sum(L^2)`` and decode
    ``a + b * sum(context) + c * batch`` (two coefficient sets, switching at a batch-size threshold). The samples
    are those formulas evaluated on a grid (single prompts of 16..max_model_len tokens, batched prompts up to 4096
    tokens, decode batches of 1..256 at contexts of 128..max_model_len), marked as such in their ``origin``.

    Args:
        coefficients_json: ``profiler-a100-80g.vllm.json`` (engine ``vllm``) or ``...distserve.json``.
        capacity_csv: ``max_num_tokens.csv``.
        model: ``opt-13b`` or ``opt-66b``.
        tensor_parallel_size: TP degree present in both files.
        engine: the engine the coefficients were measured with (``vllm`` or ``distserve``).
        name: the profile's name; default ``a100-<model>-tp<N>``.

    Raises:
        ProfileFormatError: a file is malformed or lacks the selected model and TP degree.
    """
    model_info, gpu = _model_and_gpu(model, "a100-80gb")
    upstream_model = f"facebook/{model}"
    json_path = str(coefficients_json)
    try:
        table = json.loads(Path(coefficients_json).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProfileFormatError(json_path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    try:
        entry = table[upstream_model][str(tensor_parallel_size)]
        prefill = [float(v) for v in entry["prefill"]]
        for key in ("decoding_smallbs", "decoding_largebs", "decoding_large_small_bs_threshold"):
            entry[key]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileFormatError(
            json_path, None, f"no usable entry for {upstream_model} TP{tensor_parallel_size} ({exc!r})"
        ) from None

    capacity = None
    csv_path = str(capacity_csv)
    with open(capacity_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            try:
                if row["model"] == upstream_model and int(row["tp"]) == tensor_parallel_size and int(row["pp"]) == 1:
                    capacity = int(row["max_num_tokens"])
            except (KeyError, ValueError) as exc:
                raise ProfileFormatError(csv_path, reader.line_num, f"malformed row: {exc!r}") from None
    if capacity is None:
        raise ProfileFormatError(csv_path, None, f"no row for {upstream_model} tp={tensor_parallel_size} pp=1")

    max_len = model_info.max_model_len
    samples: list[StepSample] = []
    lengths = [n for n in (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096) if n <= max_len]
    for length in lengths:
        samples.append(
            StepSample(
                step_time_s=_distserve_prefill_s(prefill, [length]),
                prefill_chunks=((0, length),),
                origin=f"DistServe prefill formula, 1 x {length} tokens",
            )
        )
    for batch in (2, 4, 8, 16):
        for length in (64, 128, 256, 512):
            if batch * length <= 4096:
                samples.append(
                    StepSample(
                        step_time_s=_distserve_prefill_s(prefill, [length] * batch),
                        prefill_chunks=tuple((0, length) for _ in range(batch)),
                        origin=f"DistServe prefill formula, {batch} x {length} tokens",
                    )
                )
    for batch in (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256):
        for context in (128, 512, 1024, max_len):
            samples.append(
                StepSample(
                    step_time_s=_distserve_decode_s(entry, batch, batch * context),
                    num_decode_seqs=batch,
                    num_decode_context_tokens=batch * context,
                    origin=f"DistServe decode formula, batch {batch} at {context} context tokens each",
                )
            )
    fit = fit_step_time(samples)
    return ProfileFile(
        schema_version=1,
        metadata=ProfileMetadata(
            name=name or f"a100-{model}-tp{tensor_parallel_size}",
            model=model_info,
            hardware=gpu,
            tensor_parallel_size=tensor_parallel_size,
            engine=EngineInfo(name=engine, version=f"as profiled by DistServe ({Path(json_path).name})"),
            source=_DISTSERVE_SOURCE,
            created_with=f"tropical-sched {__version__} import_distserve",
        ),
        valid_range=valid_range_of(samples),
        kv_cache=KvCacheInfo(
            num_tokens=capacity,
            derivation=f"measured: DistServe max_num_tokens.csv ({upstream_model}, tp={tensor_parallel_size}, pp=1)",
        ),
        fit=fit,
        samples=tuple(samples),
    )
