"""The connector contract (SPEC §1): roles, metadata types, and the two halves' interfaces.

A connector type (``KVConnectorBase`` subclass) names a scheduler half and a worker half. The
engine builds the scheduler half once, in the process that schedules requests, and the worker
half once per worker, in the process that owns the KV tensors. The halves exchange only
``KVConnectorMetadata`` (scheduler -> worker) and ``ConnectorOutput`` (worker -> scheduler).

Step order, scheduler side, per request::

    get_num_new_matched_tokens -> update_state_after_alloc -> build_connector_meta (each step)
    -> update_connector_output (each step) -> request_finished (once, before blocks are freed)

Each half is called from one thread at a time (its engine's), never concurrently; the hooks'
docstrings say when each may be called again, what it must release and what its result may be
used for. ``kvbridge.kit.TransferTracker`` is an engine's side of the scheduler hooks and
``kvbridge.kit.run_worker_step`` of one worker step.

Worker side, per step::

    bind_connector_metadata -> start_load_kv -> [wait_for_layer_load / save_kv_layer per layer]
    -> wait_for_save -> get_finished -> get_block_ids_with_load_errors
    -> build_connector_worker_meta -> clear_connector_metadata
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.gauges import Gauges
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    FinishedTransfers,
    KVCacheEvent,
    KVCacheLayout,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
)

if TYPE_CHECKING:
    import torch


class KVConnectorRole(StrEnum):
    """Which half of a connector a process builds."""

    SCHEDULER = "scheduler"
    WORKER = "worker"


class KVConnectorMetadata(msgspec.Struct, kw_only=True):
    """Base of what the scheduler half sends its worker half each step."""


class KVConnectorWorkerMetadata(msgspec.Struct, kw_only=True):
    """Base of what a worker half sends back to its scheduler half each step."""


class KVConnectorHandshakeMetadata(msgspec.Struct, kw_only=True):
    """Base of the transport metadata a worker publishes at start-up (e.g. NIXL agent info)."""


class EmptyMetadata(KVConnectorMetadata):
    """Metadata of a connector with nothing to do this step."""


Stats = KVConnectorStats | MultiKVConnectorStats


@dataclass(frozen=True)
class ConnectorOutput:
    """What the worker returns to the scheduler after a step."""

    finished_sending: frozenset[str] = frozenset()
    finished_recving: frozenset[str] = frozenset()
    invalid_block_ids: frozenset[int] = frozenset()
    worker_meta: KVConnectorWorkerMetadata | None = None
    stats: Stats | None = None

    def is_empty(self) -> bool:
        return not (
            self.finished_sending
            or self.finished_recving
            or self.invalid_block_ids
            or self.worker_meta is not None
            or (self.stats is not None and not self.stats.is_empty())
        )


class KVConnectorScheduler(ABC):
    """Runs in the scheduler; owns per-request transfer plans. Never touches tensors.

    Built once per engine, in the process that schedules requests and owns the block tables;
    imports no torch. Every hook is called between steps, from the engine's scheduling thread.
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        self.config = config
        self.cache_spec = cache_spec

    @abstractmethod
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        """Tokens beyond ``num_computed_tokens`` this connector can supply, and whether async.

        Called when the engine tries to admit ``request``, after its own prefix-cache lookup
        (``num_computed_tokens``). It may be called again for the same request: in a later step
        after ``None``, when the engine found no room for the blocks (no
        ``update_state_after_alloc`` followed), and after a preemption. The latest answer
        counts: a new call replaces what an earlier one reserved (pins), and
        ``request_finished`` releases it if the request ends first.

        Never count tokens it cannot deliver; always leave the last prompt token to compute.
        ``(None, False)``: still looking, ask again next step. ``load_async``: the tokens arrive
        over later steps and the request waits until its id is in ``finished_recving``.
        """

    @abstractmethod
    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        """Blocks were allocated; ``num_external_tokens == 0`` means load nothing.

        Called once per admission that follows a match, with every block of the request
        (every cache group) and the count the match offered or 0; called a second time, with 0,
        when a request whose async load finished is admitted to run. The block ids stay the
        request's until its preemption (``SchedulerStep``) or ``request_finished`` (longer
        under ``delay_free``); a load writes only blocks after the locally computed prefix.
        """

    @abstractmethod
    def build_connector_meta(self, step: SchedulerStep) -> KVConnectorMetadata:
        """Everything the workers must do this step; resets per-step state.

        Called exactly once per engine step, after scheduling, even when nothing is scheduled
        (finished and preempted ids still travel). The result goes to every worker unchanged,
        through ``kvbridge.connector.codec`` when they run in other processes: it holds only
        msgspec values of known classes, and is not changed after it is returned.
        """

    def update_connector_output(self, output: ConnectorOutput) -> None:  # noqa: B027
        """Completions and worker metadata came back from the workers.

        Called once per step with the output of the step whose metadata was built last; ids in
        ``finished_sending``/``finished_recving`` come once each, load-error blocks no later
        than their request's ``finished_recving``.
        """

    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        """Called once when a request ends, before its blocks are freed.

        Exactly once per request id, whatever ended it (stop, length, abort, error, rejected
        before it ever ran, then with no blocks); afterwards the id only travels in the next
        step's ``finished_req_ids``. It releases what it keeps for the request (pins, plans),
        except what an async load still in flight needs until its ``finished_recving`` (the
        engine keeps those blocks until then). ``delay_free=True``: it still reads the blocks
        and the engine keeps them until the id comes back in ``finished_sending``, which must
        happen (also on failure or timeout). The params go to the client with the request's
        final output.
        """
        return FinishedRequest(False, None)

    def take_events(self) -> list[KVCacheEvent]:
        """KV cache events since the last call (then forgotten); called between steps."""
        return []

    def set_xfer_handshake_metadata(  # noqa: B027
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        """Every worker's handshake metadata (rank -> metadata), once, after the workers
        registered their KV caches and before the first request (vLLM calls it here)."""

    def get_kv_connector_stats(self) -> Stats | None:
        """Counters since the last call (then reset), or None; called between steps."""
        return None

    def get_kv_connector_gauges(self) -> Gauges:
        """What this half holds now (``kvbridge.connector.gauges``): key -> value, each 0 once
        nothing is in flight or held. Called between steps, from the engine's thread."""
        return {}

    def check_integrity(self) -> None:  # noqa: B027
        """Raise ``IntegrityError`` if internal bookkeeping is inconsistent; changes nothing.
        Tests call it after every step."""

    def shutdown(self) -> None:  # noqa: B027
        """Release scheduler-side resources (threads, sockets). Idempotent; no hook is
        called after it."""


class SupportsHMA(ABC):
    """Mixin for scheduler halves that handle several KV cache groups (hybrid models)."""

    @abstractmethod
    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        """``request_finished`` with the block ids of every group; an engine with several
        groups calls this one instead, with the same obligations."""


class KVConnectorWorker(ABC):
    """Runs in a worker; owns the registered KV tensors and the transfers on them.

    Built once per worker, in the process that owns the KV tensors (one per rank). Each step's
    hooks are called in the module docstring's order from the worker's thread, one step at a
    time; its own threads (transfers, side channels) only report through the next hooks.
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        self.config = config
        self.cache_spec = cache_spec
        self._metadata: KVConnectorMetadata | None = None

    # -- per step -----------------------------------------------------------------------------
    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        """This step's metadata (decoded, when it crossed processes), first hook of the step;
        ``RuntimeError`` if the previous step's was not cleared."""
        if self._metadata is not None:
            raise RuntimeError(
                f"{type(self).__name__}: metadata bound twice without clear_connector_metadata()"
            )
        self._metadata = metadata

    def clear_connector_metadata(self) -> None:
        """Last hook of the step, also when another hook raised; the metadata is not used
        after it."""
        self._metadata = None

    @property
    def metadata(self) -> KVConnectorMetadata:
        if self._metadata is None:
            raise RuntimeError(f"{type(self).__name__}: no connector metadata bound this step")
        return self._metadata

    @abstractmethod
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Called once at start with every layer's KV tensor (layout per ``cache_spec``).

        Before the first step; the tensors keep their storage until ``shutdown``, so their
        memory may be registered with transports here.
        """

    def start_load_kv(self) -> None:  # noqa: B027
        """Start this step's loads (may return before they finish).

        Once per step, before the forward. Loads write only the blocks the metadata names; a
        synchronous one is in place by its layer's ``wait_for_layer_load``, an async one is
        reported in ``get_finished`` (failed or not) and may not write after that.
        """

    def wait_for_layer_load(self, layer_name: str) -> None:  # noqa: B027
        """Block until ``layer_name``'s synchronous loads are in place; called before the
        forward reads that layer."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:  # noqa: B027
        """``layer_name``'s KV for this step has been written.

        Called after the forward wrote that layer (``kv_layer`` is its whole cache tensor). A
        copy started here reads only blocks whose KV is confirmed, and outlives the step only
        while the engine keeps those blocks (a running request's, or a finished one's under
        ``delay_free``).
        """

    def wait_for_save(self) -> None:  # noqa: B027
        """Block until this step's synchronous saves are done (async ones may continue);
        called once per step, after the forward."""

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        """Requests whose async send (only among ``finished_req_ids`` so far) or load finished.

        Called once per step after ``wait_for_save`` with the ids the scheduler finished since
        the previous step. Each id comes back at most once per direction: sending once the
        connector no longer reads its blocks (the engine frees them), receiving once its load
        ended, successfully or not (the engine resumes or fails it).
        """
        return FinishedTransfers(frozenset(), frozenset())

    def take_failed_recving(self) -> set[str]:
        """Request ids whose async load failed since the last call (their blocks are also in
        ``get_block_ids_with_load_errors``); called once per step after ``get_finished``,
        and reported no later than the step whose ``get_finished`` names the request. For
        engines whose block ids are not unique across KV cache groups (vLLM's hybrid caches),
        which fail or recompute such requests by id."""
        return set()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call; called once per step after
        ``get_finished``, and reported no later than the step whose ``get_finished`` names the
        request. The engine recomputes those tokens (or fails the request) and stops caching
        the blocks."""
        return set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """What this worker tells its scheduler half about the step (codec-encodable), or
        None; called once per step."""
        return None

    def get_kv_connector_stats(self) -> Stats | None:
        """Counters since the last call (then reset), or None; called once per step."""
        return None

    def get_kv_connector_gauges(self) -> Gauges:
        """As the scheduler half's: what this worker holds now (handles, leases)."""
        return {}

    # -- start-up ------------------------------------------------------------------------------
    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """What peers and the scheduler half need to reach this worker (codec-encodable), or
        None; called once, after ``register_kv_caches``."""
        return None

    def set_xfer_handshake_metadata(  # noqa: B027
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        """Handshake metadata of every worker rank (rank -> metadata)."""

    def shutdown(self) -> None:  # noqa: B027
        """Stop threads, deregister memory, release handles. Idempotent; called after the
        last step, no hook is called after it."""


class KVConnectorBase:
    """A connector type: its registered name and its scheduler and worker halves.

    Subclasses set ``scheduler_cls`` and ``worker_cls``; HMA support is declared by the
    scheduler half inheriting ``SupportsHMA``.
    """

    scheduler_cls: ClassVar[type[KVConnectorScheduler]]
    worker_cls: ClassVar[type[KVConnectorWorker]]
    # The KV layout this connector needs, or None if any works.
    required_kv_layout: ClassVar[KVCacheLayout | None] = None
    # Whether it moves one dense region per block and layer (``KVCacheLayout.is_block_dense``).
    needs_block_dense_layout: ClassVar[bool] = False

    @classmethod
    def supports_hma(cls, config: TransferConfig | None = None) -> bool:
        return issubclass(cls.scheduler_cls, SupportsHMA)

    @classmethod
    def get_required_kv_layout(cls, config: TransferConfig | None = None) -> KVCacheLayout | None:
        return cls.required_kv_layout

    @classmethod
    def check_config(cls, config: TransferConfig) -> None:
        """Refuse ``kv_connector_extra_config`` this connector cannot use (unknown or ill-typed
        keys, bad values) with ``ConfigError`` naming the key; needs no cache, so
        ``TransferConfig.from_dict`` calls it at parse time. Default: accept anything."""

    @classmethod
    def check_cache_spec(cls, config: TransferConfig, spec: KVCacheSpec) -> None:
        """Refuse a cache this connector cannot serve (hybrid without HMA, wrong layout)."""
        if spec.num_groups > 1 and not cls.supports_hma(config):
            raise ConfigError(
                f"kv_connector: {config.kv_connector} does not support hybrid KV caches "
                f"({spec.num_groups} cache groups); use a single-group model or a connector "
                "whose scheduler half implements SupportsHMA"
            )
        if cls.needs_block_dense_layout and not spec.layout.is_block_dense:
            raise ConfigError(
                f"kv_connector: {config.kv_connector} moves each block of a layer as one region; "
                f"the engine declared {spec.layout.value!r}, which splits it (use a block-first "
                "layout)"
            )
        required = cls.get_required_kv_layout(config)
        if required is not None and required != spec.layout:
            raise ConfigError(
                f"kv_connector: {config.kv_connector} needs KV layout {required.value!r}, "
                f"the engine declared {spec.layout.value!r}"
            )

    @classmethod
    def build_scheduler(
        cls, config: TransferConfig, cache_spec: KVCacheSpec
    ) -> KVConnectorScheduler:
        return cls.scheduler_cls(config, cache_spec)

    @classmethod
    def build_worker(cls, config: TransferConfig, cache_spec: KVCacheSpec) -> KVConnectorWorker:
        return cls.worker_cls(config, cache_spec)


def describe(obj: Any) -> str:
    """Class name of a connector half, for logs and stats grouping."""
    return type(obj).__name__
