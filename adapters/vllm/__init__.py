"""Tropical on vLLM: a scheduler class and a KV connector that run the core policy inside vLLM's engine.

Use (see ``docs/vllm.md``)::

    python -m vllm.entrypoints.openai.api_server --model ... \\
        --scheduler-cls tropical_sched.adapters.vllm.scheduler.make_scheduler \\
        --kv-transfer-config '{"kv_connector": "TropicalConnector", "kv_role": "kv_both",
                               "kv_connector_extra_config": {"shared_storage_path": "/shared/kv"}}' \\
        --additional-config '{"tropical": {"role": "multiplexing", "profile": "h100-llama2-70b-tp4"}}'

``tropical_sched.adapters.vllm.scheduler`` and ``.connector`` import vLLM; this package and ``.config``,
``.logic`` and ``.version`` do not.
"""

from tropical_sched.adapters.vllm.version import (
    SUPPORTED_VLLM,
    UnsupportedVllmError,
    check_vllm_version,
    installed_vllm_version,
)

__all__ = ["SUPPORTED_VLLM", "UnsupportedVllmError", "check_vllm_version", "installed_vllm_version"]
