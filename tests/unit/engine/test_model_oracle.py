"""Logit oracle: ModelRunner on a HF checkpoint against transformers' own implementation."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kvbridge.engine.loader import read_hf_config  # noqa: E402
from kvbridge.engine.runner import ModelRunner, SeqChunk  # noqa: E402

VOCAB = 300
BLOCK = 4
PROMPT_LENS = (1, 5, 8, 13)
REL_TOL = 1e-4

SHAPES: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # peaky logits: greedy argmax is not decided by rounding
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama-mqa": ("LlamaConfig", {"num_key_value_heads": 1}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "qwen2-bias": ("Qwen2Config", {}),
}


def _hf_model(kind: str, extra: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = getattr(transformers, kind)(**{**SHAPES, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):  # HF zero-inits biases: make them matter
                bias.normal_(0.0, 0.2)
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(1.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    kind, extra = VARIANTS[request.param]
    hf = _hf_model(kind, extra)
    path: Path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, str(path)


def _runner(path: str, num_blocks: int = 64) -> ModelRunner:
    return ModelRunner(
        read_hf_config(path), num_blocks=num_blocks, block_size=BLOCK, checkpoint=path
    )


def _prompts(seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def _tables(num_seqs: int, per_seq: int, num_blocks: int, seed: int = 2) -> list[list[int]]:
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)  # non-contiguous, unordered block tables
    return [ids[i * per_seq : (i + 1) * per_seq] for i in range(num_seqs)]


def _hf_last_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < REL_TOL, f"relative error {rel:.2e}"


def test_prefill_logits_match_transformers(pair: Any) -> None:
    hf, path = pair
    runner = _runner(path)
    for ids, table in zip(_prompts(), _tables(len(PROMPT_LENS), 4, 64)):
        logits = runner.execute([SeqChunk("r", ids, 0, table, True)])
        assert logits.shape == (1, VOCAB) and logits.dtype == torch.float32
        _assert_close(logits[0], _hf_last_logits(hf, ids))


def test_all_positions_match_transformers(pair: Any) -> None:
    """A chunk of one token per step over the whole prompt: every position's logits match."""
    hf, path = pair
    runner = _runner(path)
    ids = _prompts()[-1]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    table = _tables(1, 4, 64)[0]
    for pos, tok in enumerate(ids):
        got = runner.execute([SeqChunk("r", [tok], pos, table, True)])
        _assert_close(got[0], want[pos])


@pytest.mark.parametrize("cuts", [(5,), (3, 9), (4, 8, 12)])
def test_chunked_prefill_equals_whole(pair: Any, cuts: tuple[int, ...]) -> None:
    hf, path = pair
    runner = _runner(path)
    ids = _prompts()[-1]
    table = _tables(1, 4, 64, seed=len(cuts))[0]
    bounds = (0, *cuts, len(ids))
    for lo, hi in itertools.pairwise(bounds):
        logits = runner.execute([SeqChunk("r", ids[lo:hi], lo, table, hi == len(ids))])
    assert logits.shape == (1, VOCAB)
    _assert_close(logits[0], _hf_last_logits(hf, ids))


def test_batch_equals_each_alone(pair: Any) -> None:
    _, path = pair
    prompts = _prompts()
    tables = _tables(len(prompts), 4, 64)
    alone = [
        _runner(path).execute([SeqChunk(f"r{i}", p, 0, t, True)])[0]
        for i, (p, t) in enumerate(zip(prompts, tables))
    ]
    runner = _runner(path)
    # One batch mixing a prefill, a first chunk (no logits) and single-token prompts.
    chunks = [SeqChunk(f"r{i}", p, 0, t, True) for i, (p, t) in enumerate(zip(prompts, tables))]
    chunks.insert(1, SeqChunk("x", [7, 8, 9], 0, [63], False))
    batched = runner.execute(chunks)
    assert batched.shape == (len(prompts), VOCAB)
    for i, want in enumerate(alone):
        torch.testing.assert_close(batched[i], want, rtol=1e-5, atol=1e-5)


def _greedy_via_runner(
    path: str, prompts: list[list[int]], steps: int, chunk: int | None
) -> list[list[int]]:
    """Greedy decoding of all prompts in one batch; prefill in chunks of ``chunk`` tokens."""
    runner = _runner(path, num_blocks=64)
    tables = _tables(len(prompts), 6, 64)
    seqs = [list(p) for p in prompts]
    done = [0] * len(prompts)  # tokens already in the KV cache
    out: list[list[int]] = [[] for _ in prompts]
    while min(len(o) for o in out) < steps:
        chunks, owners = [], []
        for i, seq in enumerate(seqs):
            n = len(seq) - done[i] if chunk is None else min(chunk, len(seq) - done[i])
            chunks.append(SeqChunk(f"r{i}", seq[done[i] : done[i] + n], done[i], tables[i], False))
            done[i] += n
            if done[i] == len(seq):
                chunks[-1] = SeqChunk(**{**chunks[-1].__dict__, "sample": True})
                owners.append(i)
        logits = runner.execute(chunks)
        for row, i in enumerate(owners):
            tok = int(logits[row].argmax())
            seqs[i].append(tok)
            out[i].append(tok)
    return [o[:steps] for o in out]


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole-prefill", "chunked-prefill"])
def test_greedy_generation_matches_transformers(pair: Any, chunk: int | None) -> None:
    hf, path = pair
    prompts = _prompts()
    steps = 10
    want = []
    for p in prompts:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False)
        want.append(gen[0, len(p) :].tolist())
    batched = _greedy_via_runner(path, prompts, steps, chunk)
    assert batched == want
    alone = [_greedy_via_runner(path, [p], steps, chunk)[0] for p in prompts[:2]]
    assert alone == want[:2]
