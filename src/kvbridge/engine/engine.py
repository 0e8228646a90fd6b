"""LLMEngine: the reference engine (scheduler + one in-process worker) and its EngineConfig."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorRole, KVConnectorScheduler, KVConnectorWorker, Stats
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import KVCacheEvent
from kvbridge.engine.block_manager import BlockManager
from kvbridge.engine.loader import read_hf_config
from kvbridge.engine.model_config import NAMED_CONFIGS, ModelConfig
from kvbridge.engine.request import Request, RequestOutput
from kvbridge.engine.runner import ModelRunner
from kvbridge.engine.sampling import SamplingParams
from kvbridge.engine.scheduler import Scheduler, SchedulerConfig
from kvbridge.engine.worker import Worker
from kvbridge.kit.hashing import HASH_ALGOS, BlockHasher, HashAlgo

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """How to build an ``LLMEngine``; validated on construction (errors name the key)."""

    model: str = "tiny"  # a named config (random weights) or a HF checkpoint directory
    block_size: int = 16
    num_gpu_blocks: int = 256
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 16
    max_model_len: int | None = None  # default: what the model and the KV cache allow
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    hash_algo: HashAlgo = "xxh3_128"
    kv_transfer_config: TransferConfig | None = None

    def __post_init__(self) -> None:
        for key in ("block_size", "num_gpu_blocks", "max_num_batched_tokens", "max_num_seqs"):
            _check_positive(key, getattr(self, key))
        if self.max_model_len is not None:
            _check_positive("max_model_len", self.max_model_len)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be a non-negative int, got {self.seed!r}")
        for key in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}: must be a bool, got {getattr(self, key)!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.hash_algo not in HASH_ALGOS:
            raise ConfigError(f"hash_algo: {self.hash_algo!r} is not one of {HASH_ALGOS}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model: must be a named config or a checkpoint directory")
        if self.model not in NAMED_CONFIGS and not Path(self.model).is_dir():
            raise ConfigError(
                f"model: {self.model!r} is neither a named config "
                f"({', '.join(sorted(NAMED_CONFIGS))}) nor a checkpoint directory"
            )
        if self.kv_transfer_config is not None and not isinstance(
            self.kv_transfer_config, TransferConfig
        ):
            raise ConfigError("kv_transfer_config: must be a TransferConfig (or None)")

    @property
    def checkpoint(self) -> str | None:
        return None if self.model in NAMED_CONFIGS else self.model

    def model_config(self) -> ModelConfig:
        checkpoint = self.checkpoint
        return NAMED_CONFIGS[self.model] if checkpoint is None else read_hf_config(checkpoint)


def _check_positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: must be a positive int, got {value!r}")


class LLMEngine:
    """Runs in one process; owns the scheduler (with the block pool and the connector's
    scheduler half) and one worker (model, KV caches, the connector's worker half)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(
            config.model_config(),
            num_blocks=config.num_gpu_blocks,
            block_size=config.block_size,
            device=config.device,
            dtype=getattr(torch, config.dtype),
            checkpoint=config.checkpoint,
            seed=config.seed,
        )
        self.model_config = self.runner.model_config
        spec = self.runner.cache_spec
        self.scheduler_connector: KVConnectorScheduler | None = None
        self.worker_connector: KVConnectorWorker | None = None
        transfer = config.kv_transfer_config
        if transfer is not None:
            self.scheduler_connector = create_connector(transfer, KVConnectorRole.SCHEDULER, spec)
            self.worker_connector = create_connector(transfer, KVConnectorRole.WORKER, spec)
        self.max_model_len = self._max_model_len()
        self.block_manager = BlockManager(
            config.num_gpu_blocks, config.block_size, config.enable_prefix_caching
        )
        sched_config = SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            enable_chunked_prefill=config.enable_chunked_prefill,
            max_model_len=self.max_model_len,
            kv_load_failure_policy=transfer.kv_load_failure_policy if transfer else "recompute",
        )
        self.scheduler = Scheduler(
            sched_config,
            self.block_manager,
            self.scheduler_connector,
            vocab_size=self.model_config.vocab_size,
        )
        self.worker = Worker(self.runner, self.worker_connector)
        if self.scheduler_connector is not None and self.worker.handshake is not None:
            self.scheduler_connector.set_xfer_handshake_metadata({0: self.worker.handshake})
        self._hasher = (
            BlockHasher(config.block_size, config.hash_algo)
            if config.enable_prefix_caching
            else None
        )
        self.kv_connector_stats: Stats | None = None
        self._kv_events: list[KVCacheEvent] = []
        self.num_steps = 0  # step() calls
        self.num_passes = 0  # schedule + forward + update passes (a step runs one or two)
        self._ids = itertools.count()
        self._closed = False

    def _max_model_len(self) -> int:
        c = self.config
        limit = min(self.model_config.max_position_embeddings, c.num_gpu_blocks * c.block_size)
        if not c.enable_chunked_prefill:
            limit = min(limit, c.max_num_batched_tokens)
        if c.max_model_len is None:
            return limit
        if c.max_model_len > limit:
            raise ConfigError(
                f"max_model_len: {c.max_model_len} exceeds {limit} (model positions, KV cache "
                "capacity and, without chunked prefill, max_num_batched_tokens)"
            )
        return c.max_model_len

    # -- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> str:
        """Queue a request; returns its id. A prompt too long for the cache ends "rejected"."""
        self._check_open()
        vocab = self.model_config.vocab_size
        tokens = list(prompt_token_ids)
        if not tokens:
            raise ValueError("prompt_token_ids: must not be empty")
        bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int)]
        if bad or min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"prompt_token_ids: every id must be an int in [0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(
            rid,
            tokens,
            sampling_params or SamplingParams(),
            eos_token_ids=self.model_config.eos_token_ids,
            kv_transfer_params=kv_transfer_params,
            hasher=self._hasher,
        )
        self.scheduler.add_request(request)
        return rid

    def abort_request(self, request_id: str) -> bool:
        """End a live request; its final output comes with the next ``step``."""
        return self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_pending_transfers(self) -> bool:
        """Finished requests whose blocks the connector still uses (delayed free, loads)."""
        return self.scheduler.has_pending_transfers()

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One schedule + forward + update; outputs of requests that advanced or ended.

        A load that completes within the step computes in that step: when the update resumes
        parked loads, a second pass schedules them at once (no extra step, no idle wait in a
        serving loop, just to notice the completion). Both passes' outputs are returned.
        """
        self._check_open()
        outputs = self._pass()
        if self.scheduler.num_loads_resumed:
            outputs += self._pass()
        self.num_steps += 1
        return outputs

    def _pass(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        worker_output = self.worker.execute(sched)
        outputs = self.scheduler.update_from_output(sched, worker_output)
        self._add_stats(worker_output.connector_output.stats)
        if self.scheduler_connector is not None:
            self._add_stats(self.scheduler_connector.get_kv_connector_stats())
            self._kv_events.extend(self.scheduler_connector.take_events())
        self.num_passes += 1
        return outputs

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run the prompts to completion; final outputs in prompt order."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def drain(self, timeout_s: float = 30.0, idle_sleep_s: float = 0.001) -> list[RequestOutput]:
        """Step until no request is unfinished and no finished one still holds blocks.

        Raises ``TimeoutError`` naming what is still pending after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        outputs: list[RequestOutput] = []
        while self.has_unfinished_requests() or self.has_pending_transfers():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"drain: still pending after {timeout_s}s: "
                    f"{sorted(self.scheduler.requests)} "
                    f"({self.scheduler.num_held_requests} finished, holding blocks)"
                )
            step_outputs = self.step()
            outputs.extend(step_outputs)
            if not step_outputs and not self.scheduler.running:
                time.sleep(idle_sleep_s)
        return outputs

    def take_kv_events(self) -> list[KVCacheEvent]:
        """The connector's KV cache events since the last call (for cache-aware routers)."""
        events, self._kv_events = self._kv_events, []
        return events

    def take_kv_connector_stats(self) -> Stats | None:
        """Connector stats accumulated since the last call (both halves), then reset."""
        stats, self.kv_connector_stats = self.kv_connector_stats, None
        return stats

    def check_integrity(self) -> None:
        """Raise if the block pool, the request queues or the connector's books are inconsistent."""
        self.scheduler.check_integrity()
        if self.scheduler_connector is not None:
            self.scheduler_connector.check_integrity()

    def _add_stats(self, stats: Stats | None) -> None:
        if stats is None or stats.is_empty():
            return
        if self.kv_connector_stats is None:
            self.kv_connector_stats = type(stats)()
        if type(self.kv_connector_stats) is type(stats):
            self.kv_connector_stats.aggregate(stats)  # type: ignore[arg-type]

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LLMEngine: used after shutdown()")

    def shutdown(self) -> None:
        """Shut both connector halves down (each even if the other raises). Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for half in (self.worker_connector, self.scheduler_connector):
            if half is None:
                continue
            try:
                half.shutdown()
            except Exception as e:
                logger.exception("connector shutdown failed: %s", type(half).__name__)
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
