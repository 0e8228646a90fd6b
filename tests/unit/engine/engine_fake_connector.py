"""A scripted test connector for the engine: records every hook of both halves in one log and
fakes KV loads by copying reference K/V into the blocks the engine allocated.

Loaded through ``kv_connector_module_path="engine_fake_connector"``, class ``ScriptedConnector``.
``kv_connector_extra_config`` keys:

- ``log`` (str): key of ``LOGS`` (one list shared by both halves, events ``(half, hook, detail)``).
- ``store`` (str): key of ``STORES``; a store maps a prompt (tuple of ids) to per-layer K/V
  ``[num_tokens, 2, kv_heads, head_dim]`` from a reference run. Prompts found there are offered.
- ``load_async`` (bool), ``load_steps`` (int): loads finish after that many ``get_finished`` calls.
- ``fail_blocks`` (list[int]): block-table indices whose load fails (filled with garbage).
- ``silent_garbage`` (bool): fill loaded blocks with garbage and report nothing (a sanity check).
- ``none_first`` (int): answer ``None`` ("ask again") to a request's first n lookups
  (only for the ids in ``none_ids`` when that list is given).
- ``delay_free`` (bool), ``send_steps`` (int): ``finished_sending`` after that many polls.
- ``params`` (dict): ``kv_transfer_params`` returned by ``request_finished``.
- ``probe`` (str): key of ``PROBES``; called with the request id in ``request_finished``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import torch

from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
)
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    FinishedTransfers,
    KVCacheEvent,
    MatchResult,
    RequestView,
    SchedulerStep,
)

Event = tuple[str, str, Any]
LOGS: dict[str, list[Event]] = {}
STORES: dict[str, dict[tuple[int, ...], dict[str, torch.Tensor]]] = {}
PROBES: dict[str, Callable[[str], Any]] = {}
GARBAGE = 50.0


class Load(msgspec.Struct):
    request_id: str
    prompt: list[int]
    block_ids: list[int]
    start: int  # first token position to fill
    num_tokens: int


class ScriptedMeta(KVConnectorMetadata):
    loads: list[Load]


def _log(config: Any, half: str, hook: str, detail: Any = None) -> None:
    key = config.extra("log")
    if key is not None:
        LOGS.setdefault(key, []).append((half, hook, detail))


class ScriptedScheduler(KVConnectorScheduler):
    """Runs in the scheduler; offers stored prompts and plans their loads."""

    def __init__(self, config: Any, cache_spec: Any) -> None:
        super().__init__(config, cache_spec)
        self._lookups: dict[str, int] = {}  # request id -> lookups so far
        self._local: dict[str, int] = {}  # request id -> local tokens at the last lookup
        self._loads: list[Load] = []

    def _stored(self, request: RequestView) -> int:
        store = STORES.get(self.config.extra("store", ""), {})
        kv = store.get(tuple(request.prompt_token_ids))
        return 0 if kv is None else next(iter(kv.values())).shape[0]

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        rid = request.request_id
        _log(self.config, "S", "get_num_new_matched_tokens", (rid, num_computed_tokens))
        self._lookups[rid] = self._lookups.get(rid, 0) + 1
        none_ids = self.config.extra("none_ids")
        asks_again = none_ids is None or rid in none_ids
        if asks_again and self._lookups[rid] <= self.config.extra("none_first", 0):
            return MatchResult(None, False)
        self._local[rid] = num_computed_tokens
        available = min(self._stored(request), request.num_tokens - 1)
        ext = max(0, available - num_computed_tokens)
        return MatchResult(ext, bool(self.config.extra("load_async")) and ext > 0)

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        _log(self.config, "S", "update_state_after_alloc", (rid, num_external_tokens))
        if num_external_tokens:
            self._loads.append(
                Load(
                    rid,
                    list(request.prompt_token_ids),
                    list(block_ids[0]),
                    self._local[rid],
                    num_external_tokens,
                )
            )

    def build_connector_meta(self, step: SchedulerStep) -> ScriptedMeta:
        detail = (
            [(s.request_id, s.num_computed_tokens, s.num_scheduled_tokens) for s in step.scheduled],
            sorted(step.finished_req_ids),
            sorted(step.preempted_req_ids),
        )
        _log(self.config, "S", "build_connector_meta", detail)
        loads, self._loads = self._loads, []
        return ScriptedMeta(loads=loads)

    def update_connector_output(self, output: ConnectorOutput) -> None:
        detail = (
            sorted(output.finished_sending),
            sorted(output.finished_recving),
            sorted(output.invalid_block_ids),
        )
        _log(self.config, "S", "update_connector_output", detail)

    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        probe = PROBES.get(self.config.extra("probe", ""))
        seen = probe(request.request_id) if probe is not None else None
        _log(self.config, "S", "request_finished", (request.request_id, list(block_ids), seen))
        return FinishedRequest(bool(self.config.extra("delay_free")), self.config.extra("params"))

    def take_events(self) -> list[KVCacheEvent]:
        _log(self.config, "S", "take_events")
        return []

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        _log(self.config, "S", "get_kv_connector_stats")
        return None

    def shutdown(self) -> None:
        _log(self.config, "S", "shutdown")


class ScriptedWorker(KVConnectorWorker):
    """Runs in the worker; fills loaded blocks from the store, finishes transfers on a timer."""

    def __init__(self, config: Any, cache_spec: Any) -> None:
        super().__init__(config, cache_spec)
        self._caches: dict[str, torch.Tensor] = {}
        self._recving: dict[str, int] = {}  # request id -> polls left
        self._sending: dict[str, int] = {}  # request id -> polls left
        self._errors: dict[str, set[int]] = {}  # request id -> failed block ids
        self._ready_errors: set[int] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        _log(self.config, "W", "register_kv_caches", sorted(kv_caches))
        self._caches = kv_caches

    def get_handshake_metadata(self) -> None:
        _log(self.config, "W", "get_handshake_metadata")
        return None

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        _log(self.config, "W", "bind_connector_metadata")
        super().bind_connector_metadata(metadata)

    def start_load_kv(self) -> None:
        meta = self.metadata
        assert isinstance(meta, ScriptedMeta)
        _log(self.config, "W", "start_load_kv", [ld.request_id for ld in meta.loads])
        for load in meta.loads:
            failed = self._fill(load)
            if self.config.extra("load_async"):
                self._recving[load.request_id] = self.config.extra("load_steps", 1)
                self._errors[load.request_id] = failed
            else:
                self._ready_errors |= failed

    def _fill(self, load: Load) -> set[int]:
        bs = self.cache_spec.block_size
        store = STORES[self.config.extra("store")][tuple(load.prompt)]
        positions = torch.arange(load.start, load.start + load.num_tokens)
        table = torch.tensor(load.block_ids)
        blocks, offsets = table[positions // bs], positions % bs
        end = load.start + load.num_tokens
        failed = {
            load.block_ids[i]
            for i in self.config.extra("fail_blocks", [])
            if load.start // bs <= i and i * bs < end
        }
        for name, cache in self._caches.items():
            values = store[name][positions].clone()
            if self.config.extra("silent_garbage"):
                values.fill_(GARBAGE)
            for j, pos in enumerate(positions.tolist()):
                if load.block_ids[pos // bs] in failed:
                    values[j] = GARBAGE
            # cache: [num_blocks, 2, block_size, kv_heads, head_dim]
            cache[blocks, :, offsets] = values.to(cache.dtype)
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        _log(self.config, "W", "wait_for_layer_load", layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        _log(self.config, "W", "save_kv_layer", layer_name)

    def wait_for_save(self) -> None:
        _log(self.config, "W", "wait_for_save")

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        _log(self.config, "W", "get_finished", sorted(finished_req_ids))
        if self.config.extra("delay_free"):
            for rid in finished_req_ids:
                self._sending[rid] = self.config.extra("send_steps", 1)
        recving = _tick(self._recving)
        for rid in recving:
            self._ready_errors |= self._errors.pop(rid, set())
        return FinishedTransfers(_tick(self._sending), recving)

    def get_block_ids_with_load_errors(self) -> set[int]:
        _log(self.config, "W", "get_block_ids_with_load_errors")
        errors, self._ready_errors = self._ready_errors, set()
        return errors

    def build_connector_worker_meta(self) -> None:
        _log(self.config, "W", "build_connector_worker_meta")
        return None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        _log(self.config, "W", "get_kv_connector_stats")
        return KVConnectorStats(data={"steps": 1})

    def clear_connector_metadata(self) -> None:
        _log(self.config, "W", "clear_connector_metadata")
        super().clear_connector_metadata()

    def shutdown(self) -> None:
        _log(self.config, "W", "shutdown")


def _tick(timers: dict[str, int]) -> frozenset[str]:
    """Count one poll down on every timer; pop and return the ids that reached zero."""
    done = []
    for rid in list(timers):
        timers[rid] -= 1
        if timers[rid] <= 0:
            done.append(rid)
            del timers[rid]
    return frozenset(done)


class ScriptedConnector(KVConnectorBase):
    """Records hooks; fakes loads from a reference store; delays frees on request."""

    scheduler_cls = ScriptedScheduler
    worker_cls = ScriptedWorker
