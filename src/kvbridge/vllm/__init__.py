"""kvbridge's connectors for vLLM (``pip install kvbridge[vllm]``).

Load one with ``--kv-transfer-config '{"kv_connector": "KVBridgeMultiConnector",
"kv_connector_module_path": "kvbridge.vllm", ...}'``; see the README's "Use with vLLM".
Importing this package imports vLLM.
"""

from kvbridge.vllm.connector import (
    KVBridgeConnector,
    KVBridgeCPUOffloadConnector,
    KVBridgeMultiConnector,
    KVBridgeNixlConnector,
)

__all__ = [
    "KVBridgeCPUOffloadConnector",
    "KVBridgeConnector",
    "KVBridgeMultiConnector",
    "KVBridgeNixlConnector",
]
