"""Names of the NixlConnector's ``KVConnectorStats`` keys (SPEC §7 maps them to metrics).

Samples (one value per transfer): ``xfer_time_seconds``, ``post_time_seconds``,
``bytes_transferred``, ``num_descriptors``, ``lease_confirm_time_seconds`` (READ seen done to
the answer that settled it, when no answer had covered the READ by then),
``lease_board_read_time_seconds`` (a board READ's post to its verdict),
``stage_in_time_seconds`` (host-staged mode: READ confirmed to blocks
in the cache). Everything else is a counter. A failed load counts once across
``num_failed_transfers``/``_handshakes``/``_lease_confirms``: under its first failure's key.
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
FAILED_CONFIRMS = "num_failed_lease_confirms"
CONFIRM_TIME = "lease_confirm_time_seconds"
CONFIRMS_WITH_READ = "num_lease_confirms_with_read"  # settled by the question asked with the READ
STAGE_IN_TIME = "stage_in_time_seconds"
BOARD_CONFIRMS = "num_lease_confirms_by_board"  # settled by the producer's lease board word
BOARD_MISSES = "num_lease_board_misses"  # board READ made, proved nothing: the answer settles
BOARD_READ_TIME = "lease_board_read_time_seconds"
BOARD_FULL = "num_lease_board_full"  # producer: leases whose board bucket was full (no word)
