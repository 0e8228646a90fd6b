"""Step metadata for NixlWorker tests (a load, a hold) and a loop stepping a worker until done."""

from __future__ import annotations

from typing import Any

from nixl_helpers import Node, wait_for

from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec, SendSpec, decode_notif
from kvbridge.nixl.worker import NixlWorker

Step = tuple[frozenset[str], frozenset[str], set[int]]  # sending, recving, load errors


def step(
    worker: NixlWorker,
    meta: NixlConnectorMetadata | None = None,
    finished: frozenset[str] = frozenset(),
) -> Step:
    """One engine step of ``worker``: bind ``meta``, start loads, collect what finished."""
    worker.bind_connector_metadata(meta or NixlConnectorMetadata())
    worker.start_load_kv()
    sending, recving = worker.get_finished(finished)
    errors = worker.get_block_ids_with_load_errors()
    worker.clear_connector_metadata()
    return frozenset(sending), frozenset(recving), set(errors)


def recv(
    port: int | None,
    rid: str = "d-1",
    local: list[int] | None = None,
    remote: list[int] | None = None,
    **over: Any,
) -> NixlConnectorMetadata:
    spec_ = RecvSpec(
        request_id=rid,
        local_block_ids=(local or [2, 3, 4],),
        remote_engine_id=over.pop("engine", "prefill"),
        remote_host="127.0.0.1",
        remote_port=port or 1,
        remote_block_ids=(remote or [5, 6, 7],),
        remote_request_id=over.pop("remote_rid", "p-1"),
        **over,
    )
    return NixlConnectorMetadata(reqs_to_recv={rid: spec_})


def send(rid: str = "p-1", blocks: int = 3, lease_s: float = 30.0) -> NixlConnectorMetadata:
    return NixlConnectorMetadata(
        reqs_to_send={
            rid: SendSpec(
                request_id=rid, num_blocks=blocks, lease_duration_s=lease_s, abort_timeout_s=60.0
            )
        }
    )


def hold(producer: Node, rid: str = "p-1", blocks: int = 3, lease_s: float = 30.0) -> None:
    """The producer holds ``rid``'s blocks under a lease (its scheduler said it finished)."""
    producer.step(send(rid, blocks, lease_s), finished=frozenset({rid}))
    assert producer.worker.leases.outcome(rid) == "held"


def run_until(
    node: Node,
    done: Any,
    finished: frozenset[str] = frozenset(),
    meta: NixlConnectorMetadata | None = None,
) -> list[tuple[Any, ...]]:
    """Step ``node`` (real time, for the background handshake), the first step with ``meta``,
    until ``done(results)``."""
    results: list[tuple[Any, ...]] = [] if meta is None else [node.step(meta)]
    wait_for(lambda: done(results), poll=lambda: results.append(node.step(finished=finished)))
    return results


def as_tuple(payload: bytes) -> tuple[str, list[str]]:
    notif = decode_notif(payload)
    return notif.kind, notif.request_ids


def got_recving(rid: str) -> Any:
    return lambda results: any(rid in r[1] for r in results)
