"""A worker's ``ConnectorOutput`` across a process boundary, as typed msgpack.

The connector metadata inside it (``worker_meta``) goes through the metadata codec
(``kvbridge.connector.codec``), so a MultiConnector's children keep their classes; stats keep
their type (one connector's or per child). Scheduler metadata and handshake metadata use the
codec directly (``encode_metadata`` / ``decode_metadata``).
"""

from __future__ import annotations

import msgspec

from kvbridge.connector.base import ConnectorOutput, KVConnectorWorkerMetadata
from kvbridge.connector.codec import MetadataCodecError, decode_metadata, encode_metadata
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats


class _Output(msgspec.Struct, frozen=True):
    finished_sending: list[str]
    finished_recving: list[str]
    invalid_block_ids: list[int]
    worker_meta: bytes | None = None  # metadata codec bytes
    stats: KVConnectorStats | None = None
    per_child_stats: dict[str, KVConnectorStats] | None = None  # MultiKVConnectorStats


def encode_output(output: ConnectorOutput) -> bytes:
    """msgpack bytes of a worker step's ``ConnectorOutput``."""
    stats = output.stats
    return msgspec.msgpack.encode(
        _Output(
            finished_sending=sorted(output.finished_sending),
            finished_recving=sorted(output.finished_recving),
            invalid_block_ids=sorted(output.invalid_block_ids),
            worker_meta=None if output.worker_meta is None else encode_metadata(output.worker_meta),
            stats=stats if isinstance(stats, KVConnectorStats) else None,
            per_child_stats=(
                stats.per_connector if isinstance(stats, MultiKVConnectorStats) else None
            ),
        )
    )


def decode_output(payload: bytes) -> ConnectorOutput:
    """The ``ConnectorOutput`` ``encode_output`` encoded; ``MetadataCodecError`` if malformed."""
    try:
        wire = msgspec.msgpack.decode(payload, type=_Output)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MetadataCodecError(f"connector output: {e}") from e
    meta = None
    if wire.worker_meta is not None:
        meta = decode_metadata(wire.worker_meta, KVConnectorWorkerMetadata)
    stats: KVConnectorStats | MultiKVConnectorStats | None = wire.stats
    if wire.per_child_stats is not None:
        stats = MultiKVConnectorStats(per_connector=wire.per_child_stats)
    return ConnectorOutput(
        finished_sending=frozenset(wire.finished_sending),
        finished_recving=frozenset(wire.finished_recving),
        invalid_block_ids=frozenset(wire.invalid_block_ids),
        worker_meta=meta,
        stats=stats,
    )
