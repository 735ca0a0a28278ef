"""A quantile upper bound on a request's output length, fitted from a trace's own lengths (no text model).

Tempo (arXiv 2504.20068, section 4) schedules by a conservative upper bound on each response's length, taken as
a high quantile of the length distribution (its quantile regression forest also reads the prompt text, which a
trace does not carry), and refines it online as tokens come out: once a request has produced ``n`` tokens, the
bound is the quantile of the lengths that exceed ``n``. Here the distribution is conditioned on the prompt
length's bucket, the one request feature a trace has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tropical_sched.core.errors import ConfigError

__all__ = ["LengthSamples", "OutputLengthBound"]


@dataclass(frozen=True, slots=True)
class LengthSamples:
    """Prompt and output lengths of past requests, column-wise.

    Attributes:
        num_prompt_tokens: prompt lengths, tokens, shape (n,).
        num_output_tokens: output lengths, tokens, >= 1, shape (n,).
    """

    num_prompt_tokens: Sequence[int]
    num_output_tokens: Sequence[int]


class OutputLengthBound:
    """The ``quantile`` of output lengths per prompt-length bucket, conditioned on the tokens already produced.

    Args:
        samples: the lengths to fit from (e.g. the trace being served), >= 1 request.
        quantile: the bound's quantile, in (0, 1) (Tempo: 0.95).
        num_buckets: prompt-length buckets (log-spaced quantiles of the prompt lengths), >= 1.
        min_bucket_samples: a bucket with fewer samples falls back to the whole distribution, >= 1.

    Raises:
        ConfigError: an argument is out of range, or the samples are empty or mismatched.
    """

    def __init__(
        self, samples: LengthSamples, *, quantile: float = 0.95, num_buckets: int = 8, min_bucket_samples: int = 32
    ) -> None:
        if not 0 < quantile < 1:
            raise ConfigError(f"output length quantile must be in (0, 1), got {quantile!r}")
        if num_buckets < 1 or min_bucket_samples < 1:
            raise ConfigError(
                f"num_buckets ({num_buckets!r}) and min_bucket_samples ({min_bucket_samples!r}) must be >= 1"
            )
        prompt = np.asarray(samples.num_prompt_tokens, dtype=np.int64)
        output = np.asarray(samples.num_output_tokens, dtype=np.int64)
        if prompt.shape != output.shape or prompt.size == 0:
            raise ConfigError(
                f"length samples must be two non-empty columns of equal length, got {prompt.size} and {output.size}"
            )
        if int(output.min()) < 1:
            raise ConfigError(f"output lengths must be >= 1, got {int(output.min())}")
        self.quantile = quantile
        edges = np.unique(np.quantile(prompt, np.linspace(0, 1, num_buckets + 1)[1:-1]).astype(np.int64))
        self._edges = edges.tolist()
        everything = np.sort(output)
        self._sorted: list[np.ndarray] = []
        bucket_of = np.searchsorted(edges, prompt, side="right")
        for bucket in range(len(edges) + 1):
            members = np.sort(output[bucket_of == bucket])
            self._sorted.append(members if members.size >= min_bucket_samples else everything)

    def upper_bound(self, num_prompt_tokens: int, num_generated_tokens: int = 0) -> int:
        """Upper bound on the request's total output tokens, >= ``num_generated_tokens + 1``.

        Args:
            num_prompt_tokens: the prompt's length, tokens.
            num_generated_tokens: tokens produced so far (the bound is refined on the lengths above it).
        """
        lengths = self._sorted[_bucket(self._edges, num_prompt_tokens)]
        start = int(np.searchsorted(lengths, num_generated_tokens, side="right"))
        if start >= lengths.size:  # longer than anything seen: assume it is half done
            return max(2 * num_generated_tokens, num_generated_tokens + 1)
        index = start + math.ceil(self.quantile * (lengths.size - start)) - 1
        return max(int(lengths[min(index, lengths.size - 1)]), num_generated_tokens + 1)


def _bucket(edges: list[int], num_prompt_tokens: int) -> int:
    low, high = 0, len(edges)
    while low < high:
        mid = (low + high) // 2
        if edges[mid] <= num_prompt_tokens:
            low = mid + 1
        else:
            high = mid
    return low
