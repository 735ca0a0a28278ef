"""A KV connector that decides per request, so that one instance can be a prefill worker, a decode worker and a
colocated server at once (Tropical's multiplexing worker).

Built on vLLM's ``ExampleConnector`` (KV caches through a shared directory; runs on CPU, fine for tests and
single-node demos). Per request, from the router's ``kv_transfer_params``:

* ``do_remote_decode``: prefill here and store the KV cache for a remote decoder; the response's
  ``kv_transfer_params`` tell the router where it is;
* ``do_remote_prefill``: load the KV cache a remote prefill stored, then decode;
* neither: plain local serving; nothing is stored or loaded (``ExampleConnector`` alone would store every prompt
  and load any match).

On GPUs, vLLM's own ``NixlConnector`` already branches per request on the same two flags, so the router works with
it unchanged (``kv_role: kv_both``).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

from tropical_sched.adapters.vllm.version import check_vllm_version

__all__ = ["TropicalConnector", "covers_prompt"]

logger = logging.getLogger("vllm.tropical_sched")


def covers_prompt(entry: Any) -> bool:
    """Whether an ExampleConnector store entry covers its whole (block-aligned) prompt: its slot mapping, built
    from the blocks allocated in the request's first step, is as long as its token ids. It is shorter when the
    first step prefilled only a chunk."""
    return int(entry.slot_mapping.numel()) >= int(entry.token_ids.numel())


def _params(request: Any) -> dict[str, Any]:
    return dict(getattr(request, "kv_transfer_params", None) or {})


class TropicalConnector(ExampleConnector):
    """Per-request KV storing and loading on top of ``ExampleConnector`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        self._store_request_ids: set[str] = set()  # requests whose KV goes to a remote decoder
        self._store_prompts: dict[str, tuple[int, ...]] = {}  # request id -> its prompt, for filtering stores
        self.num_stored = 0
        self.num_loaded = 0
        self.num_store_skipped = 0  # stores dropped because the prompt was chunked (see covers_prompt)

    # -- scheduler side -----------------------------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        if _params(request).get("do_remote_decode"):
            self._store_request_ids.add(request.request_id)
            self._store_prompts[request.request_id] = tuple(request.prompt_token_ids or ())

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not _params(request).get("do_remote_prefill"):
            return 0, False
        matched, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        if matched:
            self.num_loaded += 1
        return matched, is_async

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        meta = super().build_connector_meta(scheduler_output)
        allowed = [
            self._store_prompts[new.req_id]
            for new in scheduler_output.scheduled_new_reqs
            if new.req_id in self._store_request_ids
        ]
        kept = []
        for entry in meta.requests:
            if entry.is_store:
                stored = tuple(int(t) for t in entry.token_ids.tolist())
                if not any(prompt[: len(stored)] == stored for prompt in allowed):
                    continue  # a plain or loading request: ExampleConnector would store it; we do not
                if not covers_prompt(entry):
                    # ExampleConnector stores a prompt once, in its first step; a chunked first step would store
                    # a part under the whole prompt's key, and the decoder's load would fail on the shape (the
                    # engine dies). Without a store the decoder finds nothing and recomputes the prompt.
                    self.num_store_skipped += 1
                    logger.warning(
                        "prompt of %d tokens was chunked on a prefill worker: its KV is not stored, the decoding "
                        "instance recomputes it (run prefill instances with --no-enable-chunked-prefill)",
                        len(stored),
                    )
                    continue
                self.num_stored += 1
            kept.append(entry)
        meta.requests = kept
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._store_prompts.pop(request_id, None)
        if request_id not in self._store_request_ids:
            return False, None
        self._store_request_ids.discard(request_id)
        # ExampleConnector saves synchronously during the forward pass, so the blocks can be freed now.
        return False, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self._vllm_config.kv_transfer_config.engine_id,
            "remote_num_tokens": len(request.prompt_token_ids or ()),
        }
