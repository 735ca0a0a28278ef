"""Profile a running OpenAI-compatible server from outside, by timing streamed tokens.

For engines that cannot be loaded in this process (SGLang, a remote vLLM). From outside a step's composition is
not visible, so the samples are what the timing of streams allows:

* prefill: one request alone, ``max_tokens=1``; its time to first token is taken as the prefill step of the whole
  prompt (it also holds the HTTP round trip and tokenisation-free request handling, a constant that lands in the
  fit's constant term);
* decode: ``B`` streams of ``C``-token prompts started together; their time per output token while all ``B``
  decode (:func:`decode_step_estimate_s`) is taken as the step time of a batch of ``B`` decodes at the mean
  context over that window.

Mixed steps cannot be told apart from outside, so endpoint profiles have none (the multiplexing interference is
then the model's sum of prefill and decode terms). Prompts are token-id lists, so lengths are exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from tropical_sched.core.errors import ConfigError
from tropical_sched.predictors.profile import (
    EngineInfo,
    HardwareInfo,
    ModelInfo,
    ProfileFile,
    ServingOverheads,
    StepSample,
)
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.profiling.pinning import format_cpu_list
from tropical_sched.profiling.sweep import Scenario, StepRecord, build_profile, plan_sweep
from tropical_sched.serve.openai import iter_sse

__all__ = [
    "decode_step_estimate_s",
    "kv_cache_tokens_from_metrics",
    "model_info_from_config",
    "profile_endpoint",
    "serving_overheads",
    "with_serving_overheads",
]


def model_info_from_config(model_dir: str | Path, max_model_len: int) -> ModelInfo:
    """Model shape from a Hugging Face ``config.json`` (read as JSON; no transformers needed).

    Raises:
        ConfigError: the file is missing or lacks a field, named with the path.
    """
    from tropical_sched.profiling.vllm_inprocess import estimate_num_params

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
        heads = config["num_attention_heads"]
        hf = SimpleNamespace(**config)
        dtype_bytes = 4 if config.get("torch_dtype") == "float32" else 2
        return ModelInfo(
            name=str(model_dir),
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            num_params=estimate_num_params(hf),
            bytes_per_param=dtype_bytes,
            kv_bytes_per_element=dtype_bytes,
            max_model_len=max_model_len,
        )
    except OSError as exc:
        raise ConfigError(f"--model: cannot read {path}: {exc}") from None
    except (KeyError, ValueError, AttributeError) as exc:
        raise ConfigError(f"--model: {path} lacks a usable field: {exc!r}") from None


def kv_cache_tokens_from_metrics(metrics_text: str) -> int | None:
    """KV-cache capacity from a vLLM ``/metrics`` page (``vllm:cache_config_info`` labels ``num_gpu_blocks`` and
    ``block_size``); ``None`` when absent."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(
                part.split("=", 1) for part in line[line.index("{") + 1 : line.rindex("}")].split(",") if "=" in part
            )
            blocks = labels.get("num_gpu_blocks", '""').strip('"')
            block_size = labels.get("block_size", '""').strip('"')
            if blocks.isdigit() and block_size.isdigit():
                return int(blocks) * int(block_size)
    return None


async def _stream_times(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, list[tuple[float, int]]]:
    """Send one streaming request; returns its start time and ``(arrival time, completion tokens so far)`` per
    event (an event can carry several tokens when the server coalesces the output of a slow reader)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    started = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    num_tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise ConfigError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for event in iter_sse(response):
            now = time.perf_counter()
            if event.get("error") is not None or event.get("object") == "error":
                # SGLang refuses a too-long prompt with HTTP 200 and an error event: no token, no step
                raise ConfigError(f"{url}: the server refused the request: {str(event)[:300]}")
            usage = event.get("usage") or {}
            has_text = any(choice.get("text") for choice in event.get("choices") or [])
            count = usage.get("completion_tokens")
            new_count = int(count) if count is not None else num_tokens + (1 if has_text else 0)
            if new_count > num_tokens:
                num_tokens = new_count
                arrivals.append((now, num_tokens))
    return started, arrivals


def decode_step_estimate_s(streams: list[list[tuple[float, int]]]) -> tuple[float, float] | None:
    """The decode step time of concurrent streams, from the window where all of them decode: it opens at the last
    stream's first token and closes at the first stream's last token. Per stream, the window's length over the
    tokens it generated inside (its count at the last arrival before each end); the median over streams. Also
    returns the mean number of tokens generated at the window's middle. A stream counts if it generated at least
    two tokens in the window, read in at least three separate arrivals; ``None`` if none does (the streams were
    too staggered, or the client read them in bursts).

    Counting tokens over a fixed window, not timing gaps between arrivals: a client that reads slower than the
    server gets several tokens in one read, so gaps swing between zero and several steps, while counts at the
    window's ends lag by about the same delay.
    """
    if not streams or any(not arrivals for arrivals in streams):
        return None
    window_start = max(arrivals[0][0] for arrivals in streams)
    window_end = min(arrivals[-1][0] for arrivals in streams)

    def count_at(arrivals: list[tuple[float, int]], at: float) -> int:
        return max((n for t, n in arrivals if t <= at), default=0)

    per_stream = []
    middles = []
    for arrivals in streams:
        start_count, end_count = count_at(arrivals, window_start), count_at(arrivals, window_end)
        num_reads_inside = sum(1 for t, _ in arrivals if window_start < t <= window_end)
        # A stream read in one or two bursts inside the window says nothing about the step time.
        if end_count - start_count >= 2 and num_reads_inside >= 3:
            per_stream.append((window_end - window_start) / (end_count - start_count))
            middles.append((start_count + end_count) / 2)
    if not per_stream:
        return None
    return statistics.median(per_stream), statistics.mean(middles)


async def _sweep(url: str, model: str, scenarios: list[Scenario], progress: Any, timeout_s: float) -> list[StepRecord]:
    rng = random.Random(0)
    records: list[StepRecord] = []

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, 300) for _ in range(n)]

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for scenario in scenarios:
            if scenario.kind == "prefill":
                started, arrivals = await _stream_times(client, url, model, prompt(scenario.num_prefill_tokens), 1)
                if arrivals:
                    records.append(
                        StepRecord(arrivals[0][0] - started, ((0, scenario.num_prefill_tokens),), (), scenario.label)
                    )
            elif scenario.kind == "decode":
                c, k = scenario.num_decode_prompt_tokens, 4 * scenario.num_decode_output_tokens
                streams = await asyncio.gather(
                    *(_stream_times(client, url, model, prompt(c), k) for _ in range(scenario.num_decode_seqs))
                )
                estimate = decode_step_estimate_s([arrivals for _, arrivals in streams])
                if estimate is not None:
                    step_s, generated = estimate
                    context = round(c + generated)
                    records.append(StepRecord(step_s, (), (context,) * scenario.num_decode_seqs, scenario.label))
            progress.update(1)
    return records


def profile_endpoint(
    url: str,
    *,
    model_dir: str,
    served_model_name: str,
    out_name: str,
    engine_name: str,
    num_kv_cache_tokens: int | None = None,
    max_num_seqs: int = 32,
    quick: bool = False,
    repetitions: int = 3,
    device_name: str = "unknown (profiled through an endpoint)",
    interconnect_bandwidth_bytes_per_s: float = 32e9,
    timeout_s: float = 600.0,
    progress: bool = True,
    confirm: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> ProfileFile:
    """Measure a running server and return the fitted profile (see the module docstring for what is measured).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        model_dir: directory with the model's ``config.json`` (its shape; the weights are not read).
        served_model_name: the ``model`` field the server expects.
        out_name: the profile's name.
        engine_name: ``vllm`` or ``sglang`` (recorded; the engine's version comes from ``/version`` when served).
        num_kv_cache_tokens: KV-cache capacity; default read from vLLM's ``/metrics`` or SGLang's
            ``/get_server_info``.
        max_num_seqs: the largest decode batch to try (at most the server's running-request limit).
        quick: coarse grid.
        repetitions: runs of each scenario.
        device_name: what the server runs on, recorded.
        interconnect_bandwidth_bytes_per_s: worker-to-worker KV bandwidth to record.
        timeout_s: per-request HTTP timeout.
        progress: show a progress bar.
        confirm: receives the plan before the sweep starts.

    Raises:
        ConfigError: the server is unreachable, answers an error, or its capacity cannot be read and was not given.
    """
    url = url.rstrip("/")
    try:
        models = httpx.get(url + "/v1/models", timeout=10).json()
        max_model_len = next(
            (int(m.get("max_model_len") or 0) for m in models.get("data", []) if m.get("id") == served_model_name), 0
        ) or json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 2048)
        version = ""
        max_num_prompt_tokens = max_model_len - 1
        for path in ("/version", "/get_server_info"):
            response = httpx.get(url + path, timeout=10)
            if response.status_code == 200:
                info = response.json()
                version = version or str(info.get("version", ""))
                if num_kv_cache_tokens is None and info.get("max_total_num_tokens"):
                    num_kv_cache_tokens = int(info["max_total_num_tokens"])
                # SGLang takes prompts shorter than its max_req_input_len (its context less a few tokens)
                if info.get("max_req_input_len"):
                    max_num_prompt_tokens = min(max_num_prompt_tokens, int(info["max_req_input_len"]) - 1)
        if num_kv_cache_tokens is None:
            num_kv_cache_tokens = kv_cache_tokens_from_metrics(httpx.get(url + "/metrics", timeout=10).text)
    except (httpx.HTTPError, ValueError) as exc:
        raise ConfigError(f"--endpoint {url}: {exc!r}") from None
    if num_kv_cache_tokens is None:
        raise ConfigError(f"--endpoint {url}: KV-cache capacity not found in its metrics; pass --kv-cache-tokens")
    grid, scenarios = plan_sweep(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_prompt_tokens,
        num_kv_cache_tokens=num_kv_cache_tokens,
        quick=quick,
        repetitions=repetitions,
    )
    scenarios = [s for s in scenarios if s.kind in ("prefill", "decode")]
    confirm(
        f"tropical-profile: {len(scenarios)} scenarios against {url} (prefill lengths {list(grid.prefill_tokens)}, "
        f"decode batches {list(grid.decode_batch_sizes)} x contexts {list(grid.decode_context_tokens)}, "
        f"{repetitions} repetitions); no mixed steps from outside"
    )
    from tqdm import tqdm

    with tqdm(total=len(scenarios), desc="profiling", unit="scenario", file=sys.stderr, disable=not progress) as bar:
        records = asyncio.run(_sweep(url, served_model_name, scenarios, bar, timeout_s))
    return build_profile(
        records,
        name=out_name,
        model=model_info_from_config(model_dir, max_model_len),
        hardware=HardwareInfo(
            gpu_name=device_name,
            gpu_memory_bytes=1,
            interconnect="given",
            interconnect_bandwidth_bytes_per_s=interconnect_bandwidth_bytes_per_s,
        ),
        tensor_parallel_size=1,
        engine=EngineInfo(name=engine_name, version=version or "unknown"),
        num_kv_cache_tokens=num_kv_cache_tokens,
        kv_cache_derivation="read from the server's /metrics or /get_server_info, or given",
        source_description=(
            f"measured by tropical-profile {engine_name} --endpoint {url}: TTFT of single requests (prefill) and "
            "median inter-token gaps of concurrent streams (decode), timed by the client"
        ),
        environment={
            "endpoint": url,
            "served_model_name": served_model_name,
            "repetitions": str(repetitions),
            # the client's cores: the times include its reading of the streams
            "client_cpu_affinity": format_cpu_list(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "",
        },
    )


def _non_negative_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(intercept, slope)``, both >= 0, of the least-squares line through ``(x, y)`` points: the free fit if it
    is non-negative, else the better of the two fits with one of them held at 0 (non-negative least squares in
    two unknowns)."""
    n = len(points)
    sum_x = sum(x for x, _ in points)
    sum_y = sum(y for _, y in points)
    sum_xx = sum(x * x for x, _ in points)
    sum_xy = sum(x * y for x, y in points)
    candidates = [(max(0.0, sum_y / n), 0.0), (0.0, max(0.0, sum_xy / sum_xx) if sum_xx else 0.0)]
    determinant = n * sum_xx - sum_x * sum_x
    if determinant > 0:
        slope = (n * sum_xy - sum_x * sum_y) / determinant
        intercept = (sum_y - slope * sum_x) / n
        if slope >= 0 and intercept >= 0:
            candidates.append((intercept, slope))
    return min(candidates, key=lambda c: sum((y - c[0] - c[1] * x) ** 2 for x, y in points))


def serving_overheads(served_samples: Sequence[StepSample], engine: StepTimeModel, *, source: str) -> ServingOverheads:
    """What a server adds to its engine's steps: an endpoint sweep of the served engine against the engine's own
    step-time model (an in-process profile of the same engine on the same cores).

    * Decode: the gap between streamed tokens of ``B`` concurrent streams is one engine step plus what serving adds
      once per step and once per token streamed in it, ``gap - T_dec(B) = per_step_s + B * per_streamed_token_s``.
      Fitted (non-negative least squares) to each batch size's median residual, so a stalled stream does not
      tilt the line.
    * Prefill: a lone request's TTFT is its prefill step, the serving cost of that step and of its first token,
      and what the request pays once: ``per_request_s = median(TTFT - T_pf(L) - per_step_s -
      per_streamed_token_s)``, >= 0.

    The P/D hop is not measured here (one engine); its fields are 0.

    Args:
        served_samples: the samples of :func:`profile_endpoint` against the served engine (lone prefills and
            decode batches).
        engine: the engine's step-time model in-process (``Profile.step_time``).
        source: what the result's ``source`` says.

    Raises:
        ConfigError: the samples hold no lone prefill or no decode batch.
    """
    decode_residuals: dict[int, list[float]] = {}  # batch size -> gap minus the engine's step (s)
    prefill_samples: list[StepSample] = []
    for sample in served_samples:
        if sample.num_decode_seqs and not sample.prefill_chunks:
            predicted = engine.decode_step_time_s(sample.num_decode_seqs, sample.num_decode_context_tokens)
            decode_residuals.setdefault(sample.num_decode_seqs, []).append(sample.step_time_s - predicted)
        elif len(sample.prefill_chunks) == 1 and sample.prefill_chunks[0][0] == 0 and not sample.num_decode_seqs:
            prefill_samples.append(sample)
    if not decode_residuals or not prefill_samples:
        raise ConfigError(
            f"serving overheads need lone prefills and decode batches of the served engine; got "
            f"{len(prefill_samples)} prefills and {sum(map(len, decode_residuals.values()))} decode batches"
        )
    per_step_s, per_streamed_token_s = _non_negative_line(
        [(float(b), statistics.median(r)) for b, r in sorted(decode_residuals.items())]
    )
    per_request = [
        s.step_time_s - engine.prefill_time_s(s.prefill_chunks[0][1]) - per_step_s - per_streamed_token_s
        for s in prefill_samples
    ]
    return ServingOverheads(
        per_step_s=per_step_s,
        per_streamed_token_s=per_streamed_token_s,
        per_request_s=max(0.0, statistics.median(per_request)),
        source=source,
    )


def with_serving_overheads(engine: ProfileFile, served: ProfileFile, *, name: str) -> ProfileFile:
    """The engine's profile with the ``serving`` section that :func:`serving_overheads` measures in ``served``
    (an endpoint profile of the same engine behind its server), named ``name``; the served profile's environment
    (endpoint, client cores) is kept with a ``serving_`` prefix."""
    from tropical_sched.predictors.profile import Profile

    endpoint = served.metadata.environment.get("endpoint", "an endpoint")
    overheads = serving_overheads(
        served.samples,
        Profile(engine).step_time,
        source=(
            f"measured by tropical-profile --endpoint {endpoint} against {engine.metadata.name}: the served engine's "
            f"TTFT and token gaps minus this profile's steps ({len(served.samples)} samples)"
        ),
    )
    environment = {
        **engine.metadata.environment,
        **{f"serving_{key}": value for key, value in served.metadata.environment.items()},
    }
    metadata = engine.metadata.model_copy(update={"name": name, "environment": environment})
    return engine.model_copy(update={"metadata": metadata, "serving": overheads})
