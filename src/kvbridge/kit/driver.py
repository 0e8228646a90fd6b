"""ConnectorDriver: both halves of one connector stepped in one process, as an engine steps
them (SPEC §1), for tests of connectors and of the glue an engine writes around them."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
)
from kvbridge.connector.codec import decode_metadata, encode_metadata
from kvbridge.connector.types import ScheduledRequest, SchedulerStep
from kvbridge.kit.wire import decode_output, encode_output
from kvbridge.kit.worker_step import run_worker_step

if TYPE_CHECKING:
    import torch


class ConnectorDriver:
    """Runs in a test; owns nothing but the step count and the metadata and outputs so far.

    Each ``step``: ``build_connector_meta`` -> the worker's step (``run_worker_step``, with the
    per-layer hooks over ``kv_caches`` if given) -> ``update_connector_output``, checking the
    scheduler half's integrity before and after. With ``wire=True`` the metadata and the output
    cross the codec, as they do between an engine's processes. Without a worker half the
    output is the one passed to ``step`` (or an empty one).
    """

    def __init__(
        self,
        scheduler: KVConnectorScheduler,
        worker: KVConnectorWorker | None = None,
        check: Callable[[], None] | None = None,
        *,
        kv_caches: Mapping[str, torch.Tensor] | None = None,
        wire: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.worker = worker
        self.check = check if check is not None else scheduler.check_integrity
        self.kv_caches = kv_caches
        self.wire = wire
        self.step_id = 0
        self.metas: list[Any] = []  # every step's metadata, as the worker got it
        self.outputs: list[ConnectorOutput] = []  # every step's output, as the scheduler got it

    def step(
        self,
        *scheduled: ScheduledRequest,
        finished: frozenset[str] = frozenset(),
        preempted: frozenset[str] = frozenset(),
        forward: Callable[[], object] | None = None,
        worker_output: ConnectorOutput | None = None,
    ) -> ConnectorOutput:
        """One engine step with ``scheduled`` requests; ``finished`` ended since the last one."""
        step = SchedulerStep(self.step_id, tuple(scheduled), finished, preempted)
        self.step_id += 1
        meta = self.scheduler.build_connector_meta(step)
        if self.wire:
            meta = decode_metadata(encode_metadata(meta), KVConnectorMetadata)
        self.metas.append(meta)
        self.check()
        if self.worker is None:
            output = worker_output or ConnectorOutput()
        else:
            output = run_worker_step(self.worker, meta, finished, forward or self._layers)
        if self.wire:
            output = decode_output(encode_output(output))
        self.scheduler.update_connector_output(output)
        self.outputs.append(output)
        self.check()
        return output

    def run_until(
        self,
        done: Callable[[ConnectorOutput], bool],
        *scheduled: ScheduledRequest,
        finished: frozenset[str] = frozenset(),
        timeout_s: float = 10.0,
    ) -> list[ConnectorOutput]:
        """Step (with the same arguments each time) until an output satisfies ``done``;
        ``TimeoutError`` after ``timeout_s``. Returns the outputs of those steps."""
        deadline = time.monotonic() + timeout_s
        outputs = [self.step(*scheduled, finished=finished)]
        while not done(outputs[-1]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ConnectorDriver: not done after {len(outputs)} steps")
            time.sleep(0.001)
            outputs.append(self.step(*scheduled, finished=finished))
        return outputs

    def _layers(self) -> None:
        if self.worker is None or self.kv_caches is None:
            return
        for name, layer in self.kv_caches.items():
            self.worker.wait_for_layer_load(name)
            self.worker.save_kv_layer(name, layer)
