"""Long-document QA through ``/v1/chat/completions`` with the official client: a repeated
document is a prefix-cache hit, and time to first token drops accordingly.

Workload (the shape of the long-document-QA benchmarks serving projects run): 4 documents of
~1,000 tokens (model ``small``, byte tokenizer), one cold round asking one question per
document, then a warm round asking two other questions per document in shuffled order; one
request at a time. TTFT is measured at the client as the time to the first streamed chunk (the
server sends nothing before the first token).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator

import openai
import pytest

from e2e.http_fixtures import running_server
from e2e.openai_helpers import sync_client

pytestmark = pytest.mark.e2e

DOC_TOKENS = 1000
MIN_GAIN = 2.0
WORDS = ["cache", "block", "prefix", "token", "decode", "prefill", "memory", "layer",
         "attention", "tensor", "page", "batch", "query", "value", "key", "model", "engine",
         "server", "transfer", "offload"]  # fmt: skip


def document(seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < DOC_TOKENS:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:DOC_TOKENS]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with running_server(model="small", num_gpu_blocks=512) as server, sync_client(server.url) as c:
        yield c


def ask(client: openai.OpenAI, doc: str, question: str) -> tuple[float, int]:
    """(TTFT in seconds, prompt tokens served from the prefix cache)."""
    messages = [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": f"{doc}\n\nQuestion: {question}"},
    ]
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model="small", messages=messages, max_tokens=2, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    ttft: float | None = None
    cached = -1
    for chunk in stream:
        if ttft is None:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    assert ttft is not None and cached >= 0
    return ttft, cached


def test_repeated_documents_cut_ttft(client: openai.OpenAI):
    docs = [document(i) for i in range(4)]
    ask(client, "warm-up: not one of the documents", "?")  # first-request costs out of the way
    cold = [ask(client, doc, "What is this document about?") for doc in docs]
    repeats = [(i, q) for i in range(len(docs)) for q in ("Which word comes first?", "Summarise.")]
    random.Random(7).shuffle(repeats)
    warm = [ask(client, docs[i], q) for i, q in repeats]
    assert all(c < 100 for _, c in cold), cold  # the shared system turn at most
    assert all(c >= DOC_TOKENS - 32 for _, c in warm), warm  # the document's full blocks
    cold_ms = 1000 * statistics.mean(t for t, _ in cold)
    warm_ms = 1000 * statistics.mean(t for t, _ in warm)
    gain = cold_ms / warm_ms
    print(f"\nlong-document QA via chat: mean TTFT cold {cold_ms:.0f} ms, warm {warm_ms:.0f} ms, "
          f"gain {gain:.1f}x")  # fmt: skip
    assert gain >= MIN_GAIN, f"TTFT cold {cold_ms:.0f} ms vs warm {warm_ms:.0f} ms: {gain:.2f}x"
