"""Names of the NixlConnector's ``KVConnectorStats`` keys (SPEC §7 maps them to metrics).

Samples (one value per transfer): ``xfer_time_seconds``, ``post_time_seconds``,
``bytes_transferred``, ``num_descriptors``. Everything else is a counter.
"""

from __future__ import annotations

XFER_TIME = "xfer_time_seconds"
POST_TIME = "post_time_seconds"
BYTES = "bytes_transferred"
NUM_DESCRIPTORS = "num_descriptors"
NUM_TRANSFERS = "num_transfers"
FAILED_TRANSFERS = "num_failed_transfers"
FAILED_HANDSHAKES = "num_failed_handshakes"
FAILED_NOTIFICATIONS = "num_failed_notifications"
NOTIFICATIONS_SENT = "num_notifications_sent"
NOTIFICATIONS_RECEIVED = "num_notifications_received"
EXPIRED_REQS = "num_kv_expired_reqs"
