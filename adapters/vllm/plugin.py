"""The ``vllm.general_plugins`` entry point: registers ``TropicalConnector`` in every vLLM process."""

from __future__ import annotations

import logging

from tropical_sched.adapters.vllm.version import UnsupportedVllmError, check_vllm_version

__all__ = ["register"]

logger = logging.getLogger("vllm.tropical_sched")  # under vLLM's logger, so its handlers print it


def register() -> None:
    """Register the Tropical KV connector with vLLM (idempotent; vLLM calls it in every process).

    On an unsupported vLLM it only logs a warning: the plug-in is loaded by every vLLM process on the machine,
    also ones that do not use Tropical. Using the scheduler or connector there fails with the reason.
    """
    try:
        version = check_vllm_version()
    except UnsupportedVllmError as exc:
        logger.warning("tropical-sched plug-in not registered: %s", exc)
        return
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if "TropicalConnector" not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            "TropicalConnector", "tropical_sched.adapters.vllm.connector", "TropicalConnector"
        )
        logger.info("tropical-sched registered TropicalConnector for vLLM %s", version)
