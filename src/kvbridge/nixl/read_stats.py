"""What a finished READ cost: stats samples, and a warning naming the likely cause when slow."""

from __future__ import annotations

import logging
import os
import time

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl import stats as keys
from kvbridge.nixl.transfers import ReadPlan
from kvbridge.nixl.transport import NixlTransport, NixlTransportError, XferHandle

logger = logging.getLogger(__name__)


def record_read(
    stats: KVConnectorStats,
    transport: NixlTransport,
    handle: XferHandle,
    plan: ReadPlan,
    *,
    posted_wall: float,
    slow_s: float,
    request_id: str,
    in_post_s: float | None = None,
) -> None:
    """Count one completed READ: ``in_post_s`` for one that ran inside its post (the post's
    wall time; NIXL's telemetry, 7-9 us a call, would say the same), else NIXL's own duration
    when it reports one, else wall time since the post."""
    seconds = time.perf_counter() - posted_wall if in_post_s is None else in_post_s
    telemetry = None
    if in_post_s is None:
        try:
            telemetry = transport.get_xfer_telemetry(handle)
        except NixlTransportError as e:
            logger.debug("no telemetry for %s: %s", request_id, e)
    if telemetry is not None and telemetry.xfer_duration_us > 0:
        seconds = telemetry.xfer_duration_us / 1e6
    stats.incr(keys.NUM_TRANSFERS)
    stats.observe(keys.XFER_TIME, seconds)
    stats.observe(keys.BYTES, plan.num_bytes)
    stats.observe(keys.NUM_DESCRIPTORS, plan.num_descs)
    if seconds > slow_s:
        logger.warning(
            "slow READ for %s: %d bytes in %d descriptors took %.3fs (%.2f GB/s); UCX_TLS=%s "
            "(run with UCX_PROTO_INFO=y to see the transports UCX picked; a VRAM path "
            "over tcp is the usual cause, kv_buffer_device='cpu' stages through host memory)",
            request_id,
            plan.num_bytes,
            plan.num_descs,
            seconds,
            plan.num_bytes / seconds / 1e9,
            os.environ.get("UCX_TLS", "(default)"),
        )
