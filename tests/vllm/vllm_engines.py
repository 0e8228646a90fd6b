"""Start vLLM engines on the tiny checkpoint and run greedy completions with log-probabilities."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32  # vLLM's CPU attention needs multiples of 32
MODULE = "kvbridge.vllm"
# The tiny random-weight Llama every vLLM test runs (2 layers, hidden 256, 2 KV heads): the
# shape of examples/vllm/tiny_checkpoint.py, which also builds the tests' weights.
_spec = importlib.util.spec_from_file_location(
    "tiny_checkpoint", Path(__file__).resolve().parents[2] / "examples/vllm/tiny_checkpoint.py"
)
assert _spec is not None and _spec.loader is not None
TINY_CHECKPOINT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(TINY_CHECKPOINT)
TINY_LLAMA: dict[str, Any] = TINY_CHECKPOINT.MODEL_SHAPE


@dataclass(frozen=True)
class Completion:
    """One greedy completion: the tokens, each one's log-probability, the cached prompt tokens."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    num_cached_tokens: int


def logprob_gap(expected: Completion, actual: Completion) -> float:
    """Largest |difference| of the chosen tokens' log-probabilities; inf if the tokens differ."""
    if expected.token_ids != actual.token_ids:
        return float("inf")
    return max(abs(a - b) for a, b in zip(expected.logprobs, actual.logprobs))


def kv_config(connector: str, extra: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A ``--kv-transfer-config`` dict loading ``connector`` from kvbridge.vllm."""
    return {
        "kv_connector": connector,
        "kv_connector_module_path": MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
        **fields,
    }


@contextlib.contextmanager
def engine(model: Path, kv_transfer_config: dict[str, Any] | None = None) -> Iterator[Any]:
    """A vLLM ``LLM`` on ``model`` (stats on, so connector metrics flow), shut down on exit."""
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if kv_transfer_config is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**kv_transfer_config)
    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        block_size=BLOCK_SIZE,
        max_model_len=512,
        num_gpu_blocks_override=64,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def complete(llm: Any, prompt: list[int], max_tokens: int = 8, **extra_args: Any) -> Completion:
    """Greedy ``max_tokens`` continuation of ``prompt`` (token ids) with log-probabilities."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=1,
        detokenize=False,
        extra_args=extra_args or None,
    )
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    choice = out.outputs[0]
    chosen = tuple(step[tok].logprob for step, tok in zip(choice.logprobs, choice.token_ids))
    return Completion(tuple(choice.token_ids), chosen, out.num_cached_tokens or 0)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
