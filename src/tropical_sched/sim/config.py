"""Cluster settings of a simulation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from tropical_sched.core.errors import check_fields
from tropical_sched.predictors.calibration import CalibrationConfig

__all__ = ["ClusterConfig", "DecodePlacementTime", "FirstTokenAt"]


class DecodePlacementTime(str, enum.Enum):
    """When a P/D request's decode worker is chosen (and its KV space reserved there)."""

    AFTER_PREFILL = "after-prefill"
    """When the prefill finishes (vLLM's P/D protocol: the decode half is sent with the prefill's answer)."""
    AT_ROUTE = "at-route"
    """When the request is routed, before its prefill starts (SGLang's protocol: both halves are sent at once,
    the decode side pre-allocates KV and the prefill waits for that handshake). The prefill is queued only once a
    decode worker takes it, and the reserved KV is held during the prefill."""


class FirstTokenAt(str, enum.Enum):
    """Where the first token of a P/D request (prefilled on one worker, decoded on another) is counted."""

    PREFILL_END = "prefill-end"
    """When its prefill ends on the prefill worker (DistServe's and the Tropical paper's accounting): the KV
    transfer and the P/D hop delay only the later tokens, and the decoding worker produces tokens 2 to N."""
    AFTER_HOP = "after-hop"
    """When the client sees it: the decoding worker streams it at the end of its first step after the KV cache
    arrived (vLLM's P/D protocol, where the decoding instance samples every output token and the prefill
    instance's one token is not streamed), so TTFT includes the transfer, the hop and that step, and the decoding
    worker produces all N tokens."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """The simulated cluster: homogeneous workers (one model instance each, TP from the profile).

    The simulated engines run the *engine* profile (``simulate(..., engine_profile=...)``, default the profile
    the policies predict with), its step times and serving overheads times ``engine_time_scale``; the policies
    predict with the other one. Both are the same by default, so predictions are exact up to the model's fit.

    Attributes:
        num_workers: workers (instances), >= 1; GPUs = ``num_workers x tensor_parallel_size``.
        num_prefill_workers: workers given the prefill role by a disaggregated policy; ``None`` for the policy's
            default (half).
        max_num_seqs: most sequences an engine batches per step (vLLM ``--max-num-seqs``; its default 256).
        num_kv_cache_tokens: KV capacity of one worker, tokens; ``None`` for the engine profile's.
        kv_link_bandwidth_bytes_per_s: bandwidth of a worker-to-worker KV transfer; ``None`` for the engine
            profile's (NVLink within a node: TP x per-GPU link bandwidth).
        kv_transfer_latency_s: fixed cost added to every KV transfer (connector handshake), seconds, >= 0.
        decode_placement: when a P/D request's decode worker is chosen (:class:`DecodePlacementTime`).
        first_token_at: where a P/D request's first token is counted (:class:`FirstTokenAt`).
        engine_time_scale: the simulated engines' step times and serving overheads (the P/D hop included) are
            the engine profile's times this factor, > 0 (2: the engines are twice as slow as that profile says;
            ``time_scaled`` of the profile file).
        engine_pd_hop_fixed_s: the engines' P/D hop, fixed part, seconds, >= 0, in place of the (scaled) engine
            profile's ``serving.pd_hop_fixed_s``; ``None`` keeps the profile's. The hop is paid on top of the KV
            transfer, from a P/D prefill's end to the decoding worker taking the request.
        engine_pd_hop_per_prompt_token_s: the hop's part per prompt token, seconds per token, >= 0, in place of
            the profile's; ``None`` keeps the profile's.
        engine_step_noise: the spread of the simulated engines' step times around their profile's (times
            ``engine_time_scale``), in [0, 2]: each step's time is multiplied by a log-normal factor with mean 1 and
            this standard deviation of its logarithm (0: every step takes exactly what the profile says; 0.1:
            about 10% step to step). A real engine's steps vary with what else runs on its cores; the policies
            still predict the mean.
        engine_step_noise_correlation: how much of a step's factor carries into the next one, in [0, 1): the
            logarithm of the factor is an AR(1) process with this coefficient and the stationary spread
            ``engine_step_noise`` (0: independent steps; 0.99: slow and fast periods lasting about a hundred
            steps, as when something else on the machine comes and goes).
        engine_noise_seed: seed of the step-time noise (each worker draws its own stream from it).
        calibration: run the router's online calibration in the simulator with these settings: each worker's
            step-time model and P/D hop are learned from what the simulated engines did, and the policies (and
            their engine-local schedulers) predict with them; ``None``: off, the policies predict with the
            profile.

    Raises:
        ConfigError: a value is out of its range.
    """

    num_workers: int = 2
    num_prefill_workers: int | None = None
    max_num_seqs: int = 256
    num_kv_cache_tokens: int | None = None
    kv_link_bandwidth_bytes_per_s: float | None = None
    kv_transfer_latency_s: float = 0.0
    decode_placement: DecodePlacementTime = DecodePlacementTime.AFTER_PREFILL
    first_token_at: FirstTokenAt = FirstTokenAt.PREFILL_END
    engine_time_scale: float = 1.0
    engine_pd_hop_fixed_s: float | None = None
    engine_pd_hop_per_prompt_token_s: float | None = None
    engine_step_noise: float = 0.0
    engine_step_noise_correlation: float = 0.0
    engine_noise_seed: int = 0
    calibration: CalibrationConfig | None = None

    def __post_init__(self) -> None:
        checks = {
            "num_workers": self.num_workers >= 1,
            "num_prefill_workers": self.num_prefill_workers is None or self.num_prefill_workers >= 0,
            "max_num_seqs": self.max_num_seqs >= 1,
            "num_kv_cache_tokens": self.num_kv_cache_tokens is None or self.num_kv_cache_tokens >= 1,
            "kv_link_bandwidth_bytes_per_s": self.kv_link_bandwidth_bytes_per_s is None
            or self.kv_link_bandwidth_bytes_per_s > 0,
            "kv_transfer_latency_s": self.kv_transfer_latency_s >= 0,
            "engine_time_scale": math.isfinite(self.engine_time_scale) and self.engine_time_scale > 0,
            "engine_pd_hop_fixed_s": self.engine_pd_hop_fixed_s is None
            or (math.isfinite(self.engine_pd_hop_fixed_s) and self.engine_pd_hop_fixed_s >= 0),
            "engine_pd_hop_per_prompt_token_s": self.engine_pd_hop_per_prompt_token_s is None
            or (math.isfinite(self.engine_pd_hop_per_prompt_token_s) and self.engine_pd_hop_per_prompt_token_s >= 0),
            "engine_step_noise": math.isfinite(self.engine_step_noise) and 0 <= self.engine_step_noise <= 2,
            "engine_step_noise_correlation": 0 <= self.engine_step_noise_correlation < 1,
            "engine_noise_seed": self.engine_noise_seed >= 0,
        }
        check_fields(self, checks)
