"""NixlConnector: prefill/decode disaggregation over NIXL (SPEC §3)."""

from __future__ import annotations

from kvbridge.config import TransferConfig
from kvbridge.connector.base import KVConnectorBase
from kvbridge.nixl.scheduler import NixlScheduler
from kvbridge.nixl.settings import NixlSettings
from kvbridge.nixl.worker import NixlWorker


class NixlConnector(KVConnectorBase):
    """Producer engines hold finished prompts' blocks; consumer engines READ them over NIXL.

    Extra config (``kv_connector_extra_config``, all optional): ``kv_lease_duration_s`` (30;
    the producer announces it at the handshake), ``heartbeat_interval_s`` (unset: a third of
    each producer's announced lease, at most 5; set: refused at the handshake with a producer
    whose lease is not longer), ``abort_timeout_s`` (480), ``transfer_timeout_s`` (30),
    ``side_channel_host`` (``kv_ip``), ``side_channel_port`` (``kv_port``; 0 picks a free port),
    ``backends`` (["UCX"]), ``nixl_wrapper`` ("nixl" | "fake" | a callable agent_name ->
    NixlTransport), ``fake_nixl`` (with "fake", the fake's knobs: ``cycles_before_xfer_done``,
    ``fail_next_xfers``, ``fail_xfers_on_post``), ``merge_contiguous_blocks`` (true),
    ``num_threads`` (2, handshake threads), ``max_handshake_bytes`` (64 MiB),
    ``enforce_handshake_compat`` (true), ``slow_transfer_s`` (1), ``progress_delay_us`` (5000),
    ``lease_board_slots`` (4096), ``notify_agent`` (true: a consumer notifies producers through
    a second NIXL agent, off its READs' endpoints). Deprecated aliases:
    ``abort_request_timeout``, ``nixl_side_channel_host``, ``nixl_side_channel_port``,
    ``kv_lease_duration``.

    ``kv_buffer_device``: "cuda" (default) lets NIXL read the KV cache where it lives; "cpu"
    stages through a registered host mirror of the cache (pinned on CUDA), for hosts where UCX
    has no fast path to GPU memory. Producer and consumer may differ. Every READ is confirmed
    with the producer's side channel before its blocks are reported good.
    """

    scheduler_cls = NixlScheduler
    worker_cls = NixlWorker
    needs_block_dense_layout = True

    @classmethod
    def check_config(cls, config: TransferConfig) -> None:
        NixlSettings.from_config(config)

    @classmethod
    def supports_hma(cls, config: TransferConfig | None = None) -> bool:
        return True
