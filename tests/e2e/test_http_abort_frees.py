"""A client that drops a streamed ``do_remote_decode`` request: P frees its blocks at once.

Its ``kv_transfer_params`` never reach a decode engine, so nobody could read the blocks; only a
request that finished by length is held (vLLM's rule). The lease here is the default 30 s, so
a hold would show for that long.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from e2e.http_fixtures import RunningServer, metric_value, running_server
from kvbridge.config import TransferConfig

pytestmark = pytest.mark.e2e

PROMPT = list(range(5, 45))  # 40 tokens: 3 blocks of 16
HELD = "kvbridge:num_blocks_held_for_remote_decode"
ABORTED = {"finished_reason": "abort"}
NIXL = TransferConfig.from_dict(
    {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"side_channel_port": 0, "nixl_wrapper": "fake"},
    }
)


@pytest.fixture(scope="module")
def producer() -> Iterator[RunningServer]:
    with running_server(kv_transfer_config=NIXL, num_gpu_blocks=128) as p:
        yield p


def _engine_state(p: RunningServer) -> tuple[int, int, bool]:
    """(engine steps so far, free GPU blocks, whether any request is live or held)."""
    return p.loop.call(
        lambda e: (
            e.num_steps,
            e.block_manager.num_free_blocks,
            e.has_unfinished_requests() or e.has_pending_transfers(),
        )
    )


def test_dropped_stream_frees_its_blocks_before_the_abort_is_reported(
    producer: RunningServer,
) -> None:
    p = producer
    steps_before, free_before, busy = _engine_state(p)
    assert not busy
    body = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True, "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip
    with (
        httpx.Client(base_url=p.url, timeout=60, trust_env=False) as client,
        client.stream("POST", "/v1/completions", json=body) as stream,
    ):
        for line in stream.iter_lines():  # read up to the first token, then hang up
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["token_ids"]:
                steps_at_drop, free_running, busy = _engine_state(p)
                assert busy and free_running < free_before  # its blocks are in use
                break  # the stream closes: the client hangs up
        dropped = time.monotonic()
    # Poll until /metrics reports the abort; by then the blocks must be back and nothing held.
    deadline = dropped + 10.0
    while not metric_value(text := p.metrics(), "kvbridge:request_success_total", **ABORTED):
        assert time.monotonic() < deadline, "the dropped request was not aborted within 10 s"
    seen_s = time.monotonic() - dropped
    steps_after, free_after, busy = _engine_state(p)
    assert metric_value(text, HELD, connector="NixlConnector") == 0
    assert (free_after, busy) == (free_before, False), "blocks still held after the abort"
    assert metric_value(text, "kvbridge:request_success_total", finished_reason="length") is None
    print(  # the figures docs/reliability.md quotes (pytest -s)
        f"abort seen {seen_s * 1e3:.1f} ms after the hang-up, blocks back by then; "
        f"{steps_after - steps_at_drop} engine steps since the first token, "
        f"{steps_at_drop - steps_before} before it"
    )
