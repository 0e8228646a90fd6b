"""A MultiConnector(NixlConnector, second child) stepped by hand, with integrity checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from nixl_helpers import BLOCK_SIZE, Node, kv_caches, spec, wait_for

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.multi import MultiConnectorMetadata
from kvbridge.connector.multi_scheduler import MultiScheduler
from kvbridge.connector.multi_worker import MultiWorker
from kvbridge.connector.types import (
    BlockStored,
    KVCacheSpec,
    Medium,
    ScheduledRequest,
    SchedulerStep,
    SimpleRequest,
)
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput, RequestStatus
from kvbridge.kit.queries import has_request_state
from kvbridge.kit.worker_step import run_worker_step
from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.metadata import NixlConnectorMetadata, SendSpec
from kvbridge.nixl.scheduler import NixlScheduler
from kvbridge.nixl.worker import NixlWorker
from kvbridge.offload.metadata import CPUOffloadMetadata
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker
from support.hashes import block_hashes

CPU_CHILD: dict[str, Any] = {
    "kv_connector": "SimpleCPUOffloadConnector",
    "kv_connector_extra_config": {"num_cpu_blocks": 8},
}
NOOP_CHILD: dict[str, Any] = {"kv_connector": "NoOpConnector"}


def nixl_child(wrapper: str | Callable[[str], Any] = "fake") -> dict[str, Any]:
    return {
        "kv_connector": "NixlConnector",
        "kv_connector_extra_config": {"nixl_wrapper": wrapper, "side_channel_port": 0},
    }


def multi_config(role: str, engine_id: str, *children: dict[str, Any]) -> TransferConfig:
    return TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_role": role,
            "engine_id": engine_id,
            "kv_connector_extra_config": {"connectors": list(children)},
        }
    )


def hashed_request(
    rid: str, tokens: list[int], params: dict[str, Any] | None = None
) -> SimpleRequest:
    return SimpleRequest(rid, list(tokens), block_hashes(tokens, BLOCK_SIZE), params)


def remote_params(port: int, block_ids: list[int], rid: str = "p-1") -> dict[str, Any]:
    return {
        "do_remote_prefill": True,
        "remote_engine_id": "prefill",
        "remote_host": "127.0.0.1",
        "remote_port": port,
        "remote_block_ids": block_ids,
        "remote_request_id": rid,
    }


def hold(producer: Node, rid: str, num_blocks: int) -> None:
    """Make a producer worker hold ``rid`` under a lease, as its scheduler would."""
    send = SendSpec(
        request_id=rid, num_blocks=num_blocks, lease_duration_s=30.0, abort_timeout_s=60.0
    )
    producer.step(NixlConnectorMetadata(reqs_to_send={rid: send}), finished=frozenset({rid}))
    assert producer.worker.leases.is_live(rid)


class FakeFactory:
    """A ``nixl_wrapper`` callable that keeps the fakes it builds (for fault injection)."""

    def __init__(self, cycles: int = 0) -> None:
        self.cycles = cycles
        self.fakes: list[FakeNixlWrapper] = []

    def __call__(self, name: str) -> FakeNixlWrapper:
        self.fakes.append(FakeNixlWrapper(name, cycles_before_xfer_done=self.cycles))
        return self.fakes[-1]


class Composite:
    """Both halves of one engine's MultiConnector, stepped the way an engine steps them.

    Every step checks SPEC §2's metadata rule (one part per child, in child order, child i
    bound to part i) and every child's integrity.
    """

    def __init__(
        self,
        role: str,
        engine_id: str = "decode",
        *,
        nixl: dict[str, Any] | None = None,
        second: dict[str, Any] = CPU_CHILD,
        s: KVCacheSpec | None = None,
    ) -> None:
        self.spec = s or spec()
        cfg = multi_config(role, engine_id, nixl or nixl_child(), second)
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, self.spec)
        worker = create_connector(cfg, KVConnectorRole.WORKER, self.spec)
        assert isinstance(sched, MultiScheduler) and isinstance(worker, MultiWorker)
        self.sched, self.worker = sched, worker
        self.cache = kv_caches(self.spec)
        for i, t in enumerate(self.cache.values()):
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)))
        worker.register_kv_caches(self.cache)
        self.metas: list[MultiConnectorMetadata] = []
        self.outputs: list[ConnectorOutput] = []
        self.step_id = 0

    @property
    def nixl(self) -> NixlScheduler:
        child = self.sched.children[0]
        assert isinstance(child, NixlScheduler)
        return child

    @property
    def cpu(self) -> CPUOffloadScheduler:
        child = self.sched.children[1]
        assert isinstance(child, CPUOffloadScheduler)
        return child

    def nixl_meta(self, k: int = -1) -> NixlConnectorMetadata:
        """The Nixl child's part of step ``k``'s metadata."""
        part = self.metas[k].metadata[0]
        assert isinstance(part, NixlConnectorMetadata)
        return part

    def cpu_meta(self, k: int = -1) -> CPUOffloadMetadata:
        """The CPU child's part of step ``k``'s metadata."""
        part = self.metas[k].metadata[1]
        assert isinstance(part, CPUOffloadMetadata)
        return part

    @property
    def nixl_fake(self) -> FakeNixlWrapper:
        transport = self.nixl_worker.registered.transport
        assert isinstance(transport, FakeNixlWrapper)
        return transport

    @property
    def nixl_worker(self) -> NixlWorker:
        child = self.worker.children[0]
        assert isinstance(child, NixlWorker)
        return child

    def step(
        self, *scheduled: ScheduledRequest, finished: frozenset[str] = frozenset()
    ) -> ConnectorOutput:
        meta = self.sched.build_connector_meta(
            SchedulerStep(self.step_id, tuple(scheduled), finished_req_ids=finished)
        )
        self.step_id += 1
        assert isinstance(meta, MultiConnectorMetadata)
        assert len(meta.metadata) == 2 and isinstance(meta.metadata[0], NixlConnectorMetadata)
        self.metas.append(meta)
        w = self.worker

        def forward() -> None:
            assert [c.metadata for c in w.children] == list(meta.metadata)
            for name, layer in self.cache.items():
                w.wait_for_layer_load(name)
                w.save_kv_layer(name, layer)

        out = run_worker_step(w, meta, finished, forward)
        self.sched.update_connector_output(out)
        self.outputs.append(out)
        self.check()
        return out

    def run_until(
        self, done: Callable[[ConnectorOutput], bool], *scheduled: ScheduledRequest
    ) -> list[ConnectorOutput]:
        """Step (with ``scheduled`` each time) until an output satisfies ``done``."""
        outs: list[ConnectorOutput] = []
        wait_for(
            lambda: any(done(o) for o in outs), poll=lambda: outs.append(self.step(*scheduled))
        )
        return outs

    def check(self) -> None:
        self.nixl.check_integrity()
        self.nixl_worker.check_integrity()
        if isinstance(self.sched.children[1], CPUOffloadScheduler):
            self.cpu.check_integrity()

    def has_state(self, rid: str) -> bool:
        """Per-request state left in the composite or either child."""
        return has_request_state(self.sched, rid)

    def cpu_worker(self) -> CPUOffloadWorker:
        child = self.worker.children[1]
        assert isinstance(child, CPUOffloadWorker)
        return child

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()


class Step(NamedTuple):
    before: tuple[RequestStatus, int] | None  # status and computed tokens when the step began
    stored: set[int]  # indices of the request's prompt blocks stored on CPU in the step


def tiny_engine(transfer: TransferConfig | None = None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="tiny",
            block_size=BLOCK_SIZE,
            num_gpu_blocks=32,
            max_model_len=64,
            kv_transfer_config=transfer,
        )
    )


def run_engine(eng: LLMEngine, rid: str, hashes: list[bytes]) -> tuple[RequestOutput, list[Step]]:
    """Step to the end; per pass (a step runs a second one when a load finished in it): the
    request's state before it, and its CPU-stored blocks."""
    steps: list[Step] = []
    final = None
    deadline = time.monotonic() + 20
    one_pass = eng._pass

    def recorded_pass() -> list[RequestOutput]:
        req = eng.scheduler.requests.get(rid)
        before = (req.status, req.num_computed_tokens) if req is not None else None
        outputs = one_pass()
        stored = {
            hashes.index(h)
            for e in eng.take_kv_events()
            if isinstance(e, BlockStored) and e.medium is Medium.CPU
            for h in e.block_hashes
            if h in hashes
        }
        steps.append(Step(before, stored))
        return outputs

    eng._pass = recorded_pass  # type: ignore[method-assign]
    while eng.has_unfinished_requests() or eng.has_pending_transfers():
        assert time.monotonic() < deadline, "engine did not drain"
        for out in eng.step():
            if out.request_id == rid and out.finished:
                final = out
        eng.check_integrity()
    assert final is not None
    return final, steps
