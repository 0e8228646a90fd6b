"""A toy engine with kvbridge's CPU tier: a prompt's KV comes back from CPU memory.

The engine owns its block pool, its KV tensors and its "model"; kvbridge's kit does the
transfer bookkeeping. The scheduler half and the worker half run in one process here; in two,
ship the bytes of ``encode_metadata`` and ``encode_output`` between them.
"""

import torch

import kvbridge

BS, NUM_BLOCKS, LAYERS, VOCAB = 4, 16, 2, 97
spec = kvbridge.KVCacheSpec(
    block_size=BS, num_blocks=NUM_BLOCKS, num_layers=LAYERS, num_kv_heads=1, head_dim=2,
    dtype="float32",
)  # fmt: skip
config = kvbridge.TransferConfig(
    kv_connector="SimpleCPUOffloadConnector", kv_connector_extra_config={"num_cpu_blocks": 32}
)
# Scheduler process: the connector's scheduler half behind the kit's tracker.
scheduler = kvbridge.create_connector(config, kvbridge.KVConnectorRole.SCHEDULER, spec)
tracker = kvbridge.TransferTracker(scheduler, BS, config.kv_load_failure_policy)
hasher = kvbridge.BlockHasher(BS)
# Worker process: the KV cache ([blocks, K/V, tokens, heads, head_dim] per layer) and the
# connector's worker half.
kv = {f"layers.{i}": torch.zeros(NUM_BLOCKS, 2, BS, 1, 2) for i in range(LAYERS)}
worker = kvbridge.create_connector(config, kvbridge.KVConnectorRole.WORKER, spec)
worker.register_kv_caches(kv)


def forward(tokens: list[int], start: int, blocks: list[int]) -> int:
    """The toy model: write each token's K/V, then pick a next token from every K so far."""
    for i, (name, layer) in enumerate(kv.items()):
        worker.wait_for_layer_load(name)
        for pos, tok in enumerate(tokens, start):
            layer[blocks[pos // BS], :, pos % BS] = float(tok + i)
        worker.save_kv_layer(name, layer)
    end = start + len(tokens)
    keys = [kv["layers.0"][blocks[p // BS], 0, p % BS, 0, 0].item() for p in range(end)]
    return int(sum(keys) * 31 + end) % VOCAB


def step(
    todo: kvbridge.ScheduledRequest | None = None,
) -> tuple[kvbridge.TransferReport, int | None]:
    """One engine step: plan, cross to the worker, run, cross back, apply the report."""
    sched_step, meta = tracker.build_step([todo] if todo else [])
    meta = kvbridge.decode_metadata(kvbridge.encode_metadata(meta))  # -> worker process
    sampled: list[int] = []

    def model() -> None:
        if todo is not None:
            start, n = todo.num_computed_tokens, todo.num_scheduled_tokens
            tokens = todo.request.all_token_ids[start : start + n]
            sampled.append(forward(tokens, start, todo.block_ids[0]))

    out = kvbridge.run_worker_step(worker, meta, sched_step.finished_req_ids, model)
    report = tracker.update(kvbridge.decode_output(kvbridge.encode_output(out)))  # <- back
    return report, (sampled[0] if sampled else None)


def generate(rid: str, prompt: list[int], max_tokens: int) -> tuple[list[int], int]:
    """Run one request to the end; its tokens and how many prompt tokens the CPU tier gave."""
    req = kvbridge.SimpleRequest(rid, list(prompt), hasher.hash_tokens(prompt))
    admission = tracker.match(req, 0)  # this engine has no prefix cache of its own: 0 local
    assert admission is not None, "SimpleCPUOffloadConnector answers at once"
    blocks = list(range(-(-(len(prompt) + max_tokens) // BS)))  # one request at a time
    tracker.allocated(req, (blocks,), 0, admission)
    if admission.load_async:  # park until the load lands
        while True:
            report, _ = step()
            if report.loaded:
                req.num_computed_tokens = report.loaded[0].num_computed_tokens
                break
    while len(req.output_token_ids) < max_tokens:
        n = req.num_tokens - req.num_computed_tokens
        todo = kvbridge.ScheduledRequest(req, (blocks,), req.num_computed_tokens, n)
        _, token = step(todo)
        req.num_computed_tokens += n
        assert token is not None
        req.output_token_ids.append(token)
    external = tracker.num_external_tokens(rid)
    if not tracker.finish(req, (blocks,)).free_now:  # a store still reads the blocks
        while rid not in step()[0].freed:
            pass
    return req.output_token_ids, external


prompt = [5, 17, 42, 8, 23, 4, 16, 15, 9, 61, 33, 2, 7]
first, from_cpu = generate("first", prompt, max_tokens=4)
for t in kv.values():  # the GPU blocks are reused by other work: their KV is gone
    t.zero_()
again, from_cpu_again = generate("again", prompt, max_tokens=4)
print(f"first: {first} (CPU tier: {from_cpu} tokens)")
print(f"again: {again} (CPU tier: {from_cpu_again} tokens)")
assert again == first and from_cpu == 0 and from_cpu_again == 12
worker.shutdown()
scheduler.shutdown()
