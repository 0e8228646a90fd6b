"""Connector metadata through the codec: every connector's, nested composites included."""

from __future__ import annotations

import msgspec
import pytest

from kvbridge.connector.base import EmptyMetadata, KVConnectorMetadata, KVConnectorWorkerMetadata
from kvbridge.connector.codec import MetadataCodecError, decode_metadata, encode_metadata
from kvbridge.connector.multi import MultiConnectorMetadata, MultiWorkerMetadata
from kvbridge.nixl.metadata import (
    NixlConnectorMetadata,
    NixlWorkerMetadata,
    RecvSpec,
    RemoteRelease,
    SendSpec,
)
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata, TransferJob

NIXL = NixlConnectorMetadata(
    reqs_to_recv={
        "d": RecvSpec(
            request_id="d",
            local_block_ids=([3, 4], [7]),
            remote_engine_id="p",
            remote_host="127.0.0.1",
            remote_port=5555,
            remote_block_ids=([1, 2], [9]),
            remote_request_id="p-1",
        )
    },
    reqs_to_send={"s": SendSpec(request_id="s", num_blocks=2, lease_duration_s=3.0,
                                abort_timeout_s=9.0, block_ids=([5, 6],))},
    reqs_aborted={"x": True},
    reqs_to_release=[RemoteRelease(remote_engine_id="p", remote_host="h", remote_port=1,
                                   remote_request_id="r")],
)  # fmt: skip
CPU = CPUOffloadMetadata(
    loads=[TransferJob(job_id=1, req_id="a", gpu_block_ids=[2, 3], cpu_block_ids=[7, 8])],
    report_when_done=["b"],
)


@pytest.mark.parametrize(
    "meta",
    [
        NIXL,
        CPU,
        EmptyMetadata(),
        MultiConnectorMetadata(metadata=(NIXL, CPU), extra_async_saves={"s": 1}),
        MultiConnectorMetadata(
            metadata=(MultiConnectorMetadata(metadata=(CPU, EmptyMetadata())), NIXL)
        ),
    ],
    ids=["nixl", "cpu", "empty", "multi", "nested-multi"],
)
def test_scheduler_metadata_round_trips_with_every_childs_type(meta: KVConnectorMetadata) -> None:
    back = decode_metadata(encode_metadata(meta))
    assert back == meta and type(back) is type(meta)
    if isinstance(meta, MultiConnectorMetadata):
        assert isinstance(back, MultiConnectorMetadata)
        assert [type(m) for m in back.metadata] == [type(m) for m in meta.metadata]


def test_plain_msgspec_loses_the_childrens_fields_which_is_why_the_codec_exists() -> None:
    wire = msgspec.msgpack.encode(MultiConnectorMetadata(metadata=(CPU,)))
    plain = msgspec.msgpack.decode(wire, type=MultiConnectorMetadata)
    assert type(plain.metadata[0]) is KVConnectorMetadata  # the control: fields gone


def test_worker_metadata_round_trips_with_empty_children() -> None:
    nixl = NixlWorkerMetadata(side_channel_host="h", side_channel_port=7, load_failures={"d": "E"})
    meta = MultiWorkerMetadata(
        metadata=(nixl, None, CPUOffloadWorkerMetadata(completed_stores=[4]))
    )
    back = decode_metadata(encode_metadata(meta), KVConnectorWorkerMetadata)
    assert back == meta
    empty = MultiWorkerMetadata(metadata=(None,))
    assert decode_metadata(encode_metadata(empty), KVConnectorWorkerMetadata) == empty


def test_unknown_classes_garbage_and_the_wrong_kind_are_refused() -> None:
    forged = msgspec.msgpack.encode({"kvb": "os:system", "f": {}})
    with pytest.raises(MetadataCodecError, match="unknown class 'os:system'"):
        decode_metadata(forged)
    with pytest.raises(MetadataCodecError):
        decode_metadata(b"\xc1")
    with pytest.raises(MetadataCodecError, match="expected KVConnectorWorkerMetadata"):
        decode_metadata(encode_metadata(CPU), KVConnectorWorkerMetadata)
    bad_field = msgspec.msgpack.encode(
        {"kvb": "kvbridge.offload.metadata:CPUOffloadMetadata", "f": {"loads": "x"}}
    )
    with pytest.raises(MetadataCodecError):
        decode_metadata(bad_field)
