"""EngineLoop: outputs reach the event loop, aborts, and an engine failure fails requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.serve.engine_loop import EngineFailure, EngineLoop, StreamItem
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.protocol import RequestError

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture
def loop() -> Iterator[EngineLoop]:
    engine_loop = EngineLoop(LLMEngine(EngineConfig(num_gpu_blocks=32)), ServerMetrics("tiny"))
    engine_loop.start()
    yield engine_loop
    engine_loop.shutdown()


async def _collect(loop: EngineLoop, prompt: list[int], params: SamplingParams) -> list[StreamItem]:
    handle = loop.submit(prompt, params)
    return [item async for item in handle.stream()]


def test_concurrent_requests_match_generate(loop: EngineLoop):
    prompts = [[1, 2, 3, 4], [9, 8, 7], list(range(20, 40))]
    with LLMEngine(EngineConfig(num_gpu_blocks=32)) as ref:
        want = [o.token_ids for o in ref.generate(prompts, GREEDY)]

    async def run() -> list[list[StreamItem]]:
        return await asyncio.gather(*(_collect(loop, p, GREEDY) for p in prompts))

    results = asyncio.run(run())
    for items, tokens in zip(results, want):
        assert all(isinstance(i, RequestOutput) for i in items)
        assert items[-1].finished and items[-1].token_ids == tokens  # type: ignore[union-attr]
        assert [len(i.token_ids) for i in items] == [1, 2, 3, 4]  # type: ignore[union-attr]
    loop.call(lambda e: e.check_integrity())


def test_invalid_request_fails_only_itself(loop: EngineLoop):
    items = asyncio.run(_collect(loop, [10_000], GREEDY))
    assert items == [EngineFailure(400, "prompt_token_ids: every id must be an int in [0, 512)")]
    assert loop.healthy


def test_abort_ends_the_request(loop: EngineLoop):
    async def run() -> list[StreamItem]:
        handle = loop.submit([1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True))
        items: list[StreamItem] = []
        async for item in handle.stream():
            items.append(item)
            if len(items) == 2:
                loop.abort(handle.request_id)
        return items

    items = asyncio.run(run())
    last = items[-1]
    assert isinstance(last, RequestOutput) and last.finish_reason == "abort"
    assert len(items) < 100
    assert loop.call(lambda e: e.has_unfinished_requests()) is False
    loop.call(lambda e: e.check_integrity())


def test_engine_failure_fails_open_requests_and_marks_unhealthy(
    loop: EngineLoop, monkeypatch: pytest.MonkeyPatch
):
    def broken_step() -> list[RequestOutput]:
        raise RuntimeError("device lost")

    monkeypatch.setattr(loop.engine, "step", broken_step)
    items = asyncio.run(_collect(loop, [1, 2, 3], GREEDY))
    assert len(items) == 1 and isinstance(items[0], EngineFailure)
    assert items[0].status == 500 and "device lost" in items[0].message
    assert not loop.healthy

    async def late() -> None:
        loop.submit([1, 2], GREEDY)

    with pytest.raises(RequestError) as info:
        asyncio.run(late())
    assert info.value.status == 503 and "device lost" in info.value.message
