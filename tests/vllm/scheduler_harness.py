"""vLLM's own ``Scheduler`` in-process over kvbridge's MultiConnector, with a fake model runner.

vLLM's scheduler builds ``KVBridgeMultiConnector`` by module path from a ``KVTransferConfig``
(children: NixlConnector, then SimpleCPUOffloadConnector). The worker half is the real kvbridge
one (the same class, role WORKER) over CPU tensors in vLLM's CPU layout: per layer
``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, contiguous (LBHNC). ``Engine.step``
calls the worker hooks in the order vLLM's model runner does and, as the forward pass, writes
into each computed token's slot of each layer a value of (engine ``salt``, layer, token prefix),
so a block's bytes say which engine computed which tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    SlidingWindowSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm_engines import TINY_LLAMA

from kvbridge.vllm import KVBridgeMultiConnector

BLOCK = 32
NUM_BLOCKS = 64
WINDOW = 2 * BLOCK  # the sliding-window group's window, in tokens
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
SAMPLED = 7  # the token every fake forward samples


def write_tiny_llama(out: Path) -> Path:
    """The tiny Llama's config: vLLM's scheduler reads the model's shape, never its weights."""
    from transformers import LlamaConfig

    LlamaConfig(**TINY_LLAMA).save_pretrained(out)
    return out


def make_vllm_config(ckpt: Path, engine_id: str, nixl_wrapper: Any) -> VllmConfig:
    nixl = {"nixl_wrapper": nixl_wrapper, "side_channel_port": 0}
    cpu = {"cpu_bytes_to_use": 2 << 20}  # 64 blocks of 2 layers x 16 KiB: as many as the GPU
    transfer = KVTransferConfig(
        kv_connector="KVBridgeMultiConnector",
        kv_connector_module_path="kvbridge.vllm",
        kv_role="kv_both",
        engine_id=engine_id,
        kv_connector_extra_config={
            "connectors": [
                {"kv_connector": "NixlConnector", "kv_connector_extra_config": nixl},
                {"kv_connector": "SimpleCPUOffloadConnector", "kv_connector_extra_config": cpu},
            ]
        },
    )
    model = ModelConfig(model=str(ckpt), skip_tokenizer_init=True, dtype="bfloat16")
    config = VllmConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        kv_transfer_config=transfer,
    )
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return config


def make_kv_cache_config(config: VllmConfig, hybrid: bool) -> KVCacheConfig:
    """Both layers full attention in one group, or (``hybrid``) layer 1 sliding window."""
    model = config.model_config
    shape: dict[str, Any] = {
        "block_size": BLOCK,
        "num_kv_heads": model.get_num_kv_heads(config.parallel_config),
        "head_size": model.get_head_size(),
        "dtype": torch.bfloat16,
    }
    full = FullAttentionSpec(**shape)
    page = full.page_size_bytes
    tensors = [KVCacheTensor(page * NUM_BLOCKS, [n], page * NUM_BLOCKS, page) for n in LAYERS]
    groups = [KVCacheGroupSpec(list(LAYERS), full)]
    if hybrid:
        groups = [
            KVCacheGroupSpec([LAYERS[0]], full),
            KVCacheGroupSpec([LAYERS[1]], SlidingWindowSpec(sliding_window=WINDOW, **shape)),
        ]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=tensors, kv_cache_groups=groups)


def slot_value(salt: int, layer: int, tokens: list[int]) -> int:
    """What the fake forward writes (as int16 bits) for the last token of ``tokens``."""
    return (salt * 7919 + layer * 104729 + sum((i + 1) * t for i, t in enumerate(tokens))) % 30011


@dataclass
class Engine:
    """One vLLM scheduler, its kvbridge worker half and KV tensors; steps as EngineCore does."""

    salt: int
    scheduler: Scheduler
    connector: Any  # the scheduler's KVBridgeMultiConnector
    worker: KVBridgeMultiConnector
    kv: dict[str, torch.Tensor]
    hasher: Callable[[Request], list[Any]]
    layer_groups: list[list[int]]  # group -> indices into LAYERS
    finish_answers: dict[str, tuple[bool, dict[str, Any] | None]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # req id -> last EngineCoreOutput
    connector_outputs: list[KVConnectorOutput] = field(default_factory=list)

    @property
    def half(self) -> Any:
        """kvbridge's MultiScheduler, the half vLLM's scheduler drives."""
        return self.connector.half

    def add(self, req_id: str, prompt: list[int], max_tokens: int, params: Any = None) -> None:
        extra = None if params is None else {"kv_transfer_params": params}
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
        self.scheduler.add_request(
            Request(req_id, prompt, sampling, None, block_hasher=self.hasher)
        )

    def step(self) -> SchedulerOutput:
        so = self.scheduler.schedule()
        w = self.worker
        w.bind_connector_metadata(so.kv_connector_metadata)
        sampled = [self._forward(req_id, n) for req_id, n in so.num_scheduled_tokens.items()]
        for name in LAYERS:  # the attention layers' hooks (kvbridge's loads are all async)
            w.wait_for_layer_load(name)
            w.save_kv_layer(name, self.kv[name], None)
        w.start_load_kv(None)  # vLLM starts async loads after the forward
        w.wait_for_save()
        results = w.get_transfer_results(so.finished_req_ids)  # as vLLM 0.32's runner asks
        kv_out = KVConnectorOutput(
            finished_sending=results.finished_sending,
            finished_recving=results.finished_recving,
            failed_recving=results.failed_recving,
            invalid_block_ids=w.get_block_ids_with_load_errors(),
            kv_connector_worker_meta=w.build_connector_worker_meta(),
            kv_connector_stats=w.get_kv_connector_stats(),
        )
        w.clear_connector_metadata()
        self.connector_outputs.append(kv_out)
        req_ids = list(so.num_scheduled_tokens)
        out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kv_connector_output=kv_out,
        )
        for outs in self.scheduler.update_from_output(so, out).values():
            self.outputs.update((o.request_id, o) for o in outs.outputs)
        return so

    def finished(self, req_id: str) -> bool:
        """vLLM forgot the request (its blocks are free)."""
        return req_id not in self.scheduler.requests

    def status(self, req_id: str) -> Any:
        return self.scheduler.requests[req_id].status

    def block_ids(self, req_id: str) -> tuple[list[int], ...]:
        return tuple(list(ids) for ids in self.scheduler.kv_cache_manager.get_block_ids(req_id))

    def hit_sources(self, req_id: str, num_tokens: int) -> dict[Any, int]:
        return self.connector.get_external_cache_hit_sources(
            self.scheduler.requests[req_id], num_tokens
        )

    def blocks(self, table: tuple[list[int], ...], num: int) -> dict[tuple[int, int], list[Any]]:
        """(group, i) -> copies of block ``table[group][i]`` in each layer of the group, for the
        first ``num`` positions of every group that hold a block (not vLLM's null block)."""
        null = self.scheduler.kv_cache_manager.block_pool.null_block.block_id
        return {
            (g, i): [self.kv[LAYERS[layer]][ids[i]].clone() for layer in self.layer_groups[g]]
            for g, ids in enumerate(table)
            for i in range(num)
            if ids[i] != null
        }

    def wipe(self) -> None:
        """Overwrite the whole KV cache (as if other requests had reused every block)."""
        for t in self.kv.values():
            t.zero_()

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()

    def _forward(self, req_id: str, num_tokens: int) -> list[int]:
        request = self.scheduler.requests[req_id]
        end = request.num_computed_tokens  # schedule() already counted this step's tokens
        tokens = request.all_token_ids
        null = self.scheduler.kv_cache_manager.block_pool.null_block.block_id
        for group, ids in enumerate(self.block_ids(req_id)):
            for pos in range(end - num_tokens, end):
                block = ids[pos // BLOCK]
                if block == null:  # a sliding-window group's block outside the window
                    continue
                for layer in self.layer_groups[group]:
                    value = slot_value(self.salt, layer, tokens[: pos + 1])
                    self.kv[LAYERS[layer]].view(torch.int16)[block, :, pos % BLOCK, :] = value
        return [SAMPLED] if end >= request.num_tokens else []


def run_until(done: Callable[[], bool], *engines: Engine, timeout: float = 20.0) -> int:
    """Step every engine in turn until ``done()``; the rounds it took. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    rounds = 0
    while not done():
        assert time.monotonic() < deadline, f"not done after {rounds} rounds"
        for engine in engines:
            engine.step()
        rounds += 1
    return rounds


def build_engine(
    ckpt: Path, *, engine_id: str, hybrid: bool, salt: int, nixl_wrapper: Any = "fake"
) -> Engine:
    config = make_vllm_config(ckpt, engine_id, nixl_wrapper)
    kv_cache_config = make_kv_cache_config(config, hybrid)
    scheduler = Scheduler(config, kv_cache_config, StructuredOutputManager(config), BLOCK)
    worker = KVBridgeMultiConnector(config, KVConnectorRole.WORKER, kv_cache_config)
    spec: Any = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    shape = (NUM_BLOCKS, spec.num_kv_heads, BLOCK, 2 * spec.head_size)
    kv = {name: torch.zeros(shape, dtype=torch.bfloat16) for name in LAYERS}
    worker.register_kv_caches(kv)
    connector: Any = scheduler.connector
    # EngineCore hands the workers' handshake metadata to the scheduler's connector.
    connector.set_xfer_handshake_metadata({0: worker.get_handshake_metadata()})
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    groups = [[LAYERS.index(n) for n in g.layer_names] for g in kv_cache_config.kv_cache_groups]
    engine = Engine(
        salt, scheduler, connector, worker, kv, get_request_block_hasher(BLOCK, hash_fn), groups
    )
    hook = connector.request_finished_all_groups

    def recording(request: Request, block_ids: tuple[list[int], ...]) -> Any:
        """Keep what the connector answers vLLM's finish of each request."""
        engine.finish_answers[request.request_id] = answer = hook(request, block_ids)
        return answer

    connector.request_finished_all_groups = recording
    return engine


def leftover_state(e: Engine, *req_ids: str) -> dict[str, Any]:
    """The non-empty per-request tables of the kvbridge halves, and vLLM's requests and blocks.

    Also runs the scheduler half's ``check_integrity`` (pins and reservations match jobs).
    """
    multi, nixl, cpu = e.half, *e.half.children
    multi_w, nixl_w, cpu_w = e.worker.half, *e.worker.half.children
    pool = e.scheduler.kv_cache_manager.block_pool
    tables = {
        "adapter requests": e.connector.scheduler._requests,
        "multi loaders": multi._loader,
        "multi async loads": multi._async_loading,
        "multi extra saves": multi._extra_async_saves,
        "nixl requests": [r for r in req_ids if nixl.has_request_state(r)],
        "nixl held or waiting": nixl.num_held_for_remote_decode + nixl.num_waiting_for_remote_kv,
        "cpu requests": cpu._requests,
        "cpu pins and stores": cpu.pool.num_pins + cpu.pool.num_storing,
        "worker extra saves": multi_w._extra_async_saves,
        "cpu worker jobs": cpu_w.num_inflight_jobs,
        "nixl worker loads and leases": nixl_w.num_inflight_loads + nixl_w.leases.num_live,
        "vllm requests": dict(e.scheduler.requests),
        "vllm blocks in use": NUM_BLOCKS - 1 - pool.get_num_free_blocks(),  # 1: the null block
    }
    multi.check_integrity()
    return {name: table for name, table in tables.items() if table}
