"""Cluster settings of a simulation."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tropical_sched.core.errors import check_fields

__all__ = ["ClusterConfig", "DecodePlacementTime"]


class DecodePlacementTime(str, enum.Enum):
    """When a P/D request's decode worker is chosen (and its KV space reserved there)."""

    AFTER_PREFILL = "after-prefill"
    """When the prefill finishes (vLLM's P/D protocol: the decode half is sent with the prefill's answer)."""
    AT_ROUTE = "at-route"
    """When the request is routed, before its prefill starts (SGLang's protocol: both halves are sent at once,
    the decode side pre-allocates KV and the prefill waits for that handshake). The prefill is queued only once a
    decode worker takes it, and the reserved KV is held during the prefill."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """The simulated cluster: homogeneous workers (one model instance each, TP from the profile).

    Attributes:
        num_workers: workers (instances), >= 1; GPUs = ``num_workers x tensor_parallel_size``.
        num_prefill_workers: workers given the prefill role by a disaggregated policy; ``None`` for the policy's
            default (half).
        max_num_seqs: most sequences an engine batches per step (vLLM ``--max-num-seqs``; its default 256).
        num_kv_cache_tokens: KV capacity of one worker, tokens; ``None`` for the profile's.
        kv_link_bandwidth_bytes_per_s: bandwidth of a worker-to-worker KV transfer; ``None`` for the profile's
            (NVLink within a node: TP x per-GPU link bandwidth).
        kv_transfer_latency_s: fixed cost added to every KV transfer (connector handshake), seconds.
        decode_placement: when a P/D request's decode worker is chosen (:class:`DecodePlacementTime`).
    """

    num_workers: int = 2
    num_prefill_workers: int | None = None
    max_num_seqs: int = 256
    num_kv_cache_tokens: int | None = None
    kv_link_bandwidth_bytes_per_s: float | None = None
    kv_transfer_latency_s: float = 0.0
    decode_placement: DecodePlacementTime = DecodePlacementTime.AFTER_PREFILL

    def __post_init__(self) -> None:
        checks = {
            "num_workers": self.num_workers >= 1,
            "num_prefill_workers": self.num_prefill_workers is None or self.num_prefill_workers >= 0,
            "max_num_seqs": self.max_num_seqs >= 1,
            "num_kv_cache_tokens": self.num_kv_cache_tokens is None or self.num_kv_cache_tokens >= 1,
            "kv_link_bandwidth_bytes_per_s": self.kv_link_bandwidth_bytes_per_s is None
            or self.kv_link_bandwidth_bytes_per_s > 0,
            "kv_transfer_latency_s": self.kv_transfer_latency_s >= 0,
        }
        check_fields(self, checks)
