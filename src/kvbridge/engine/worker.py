"""Worker: runs a scheduler step on the model, wrapped in the connector's worker hooks."""

from __future__ import annotations

import logging

import torch

from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorHandshakeMetadata,
    KVConnectorWorker,
)
from kvbridge.engine.request import Request, TokenLogprobs
from kvbridge.engine.runner import ModelRunner, SeqChunk
from kvbridge.engine.sampling import compute_logprobs, make_generator, position_seed, sample
from kvbridge.engine.scheduler import SchedulerOutput, WorkerOutput
from kvbridge.kit.worker_step import run_worker_step

logger = logging.getLogger(__name__)


class _ConnectorLayerHooks:
    """Forwards the runner's per-layer callbacks to the connector's worker half."""

    def __init__(self, connector: KVConnectorWorker) -> None:
        self._connector = connector

    def before_layer(self, layer_name: str) -> None:
        self._connector.wait_for_layer_load(layer_name)

    def after_layer(self, layer_name: str, kv_cache: torch.Tensor) -> None:
        self._connector.save_kv_layer(layer_name, kv_cache)


class Worker:
    """Runs in the worker; owns the model runner (weights, KV caches), the per-request sampling
    generators and the connector's worker half.

    Step order: ``bind_connector_metadata``, ``start_load_kv``, forward (``wait_for_layer_load``
    before and ``save_kv_layer`` after each layer), ``wait_for_save``, sampling,
    ``get_finished``, ``get_block_ids_with_load_errors``, ``build_connector_worker_meta``,
    ``get_kv_connector_stats``, ``clear_connector_metadata``.
    """

    def __init__(self, runner: ModelRunner, connector: KVConnectorWorker | None = None) -> None:
        self.runner = runner
        self.connector = connector
        self._generators: dict[str, torch.Generator | None] = {}  # request id -> generator
        self._hooks = _ConnectorLayerHooks(connector) if connector is not None else None
        # This worker's handshake metadata, for the scheduler half (None: nothing to tell).
        self.handshake: KVConnectorHandshakeMetadata | None = None
        if connector is not None:
            connector.register_kv_caches(runner.kv_caches)
            self.handshake = connector.get_handshake_metadata()
            if self.handshake is not None:
                connector.set_xfer_handshake_metadata({0: self.handshake})

    def execute(self, sched: SchedulerOutput) -> WorkerOutput:
        connector = self.connector
        for rid in sched.step.finished_req_ids:
            self._generators.pop(rid, None)
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}  # request id -> logprobs, if it asked
        if connector is None:
            self._forward(sched, sampled, logprobs)
            return WorkerOutput(sampled, ConnectorOutput(), logprobs)
        if sched.connector_meta is None:
            raise ValueError("Worker.execute: a connector is configured but the step has no meta")

        def forward() -> None:
            self._forward(sched, sampled, logprobs)

        output = run_worker_step(
            connector, sched.connector_meta, sched.step.finished_req_ids, forward
        )
        return WorkerOutput(sampled, output, logprobs)

    def _forward(
        self, sched: SchedulerOutput, sampled: dict[str, int], logprobs: dict[str, TokenLogprobs]
    ) -> None:
        """Forward, sample, and fill ``sampled`` (and ``logprobs``, from the same logits)."""
        if not sched.chunks:
            return
        seq_chunks = [
            SeqChunk(c.request_id, c.token_ids, c.start_pos, c.block_ids, c.sample)
            for c in sched.chunks
        ]
        logits = self.runner.execute(seq_chunks, self._hooks)
        sampling = [c.request for c in sched.chunks if c.sample]
        params = [r.sampling_params for r in sampling]
        generators = [self._generator(r) for r in sampling]
        tokens = sample(logits, params, generators)
        lps = compute_logprobs(logits, params, tokens)
        for r, token, lp in zip(sampling, tokens, lps, strict=True):
            sampled[r.request_id] = token
            if lp is not None:
                logprobs[r.request_id] = lp

    def _generator(self, request: Request) -> torch.Generator | None:
        """The request's generator, seeded for the output position it samples now."""
        rid, params = request.request_id, request.sampling_params
        if rid not in self._generators:
            self._generators[rid] = make_generator(params)
        generator = self._generators[rid]
        if generator is not None and params.seed is not None:
            generator.manual_seed(position_seed(params.seed, request.num_output_tokens))
        return generator
