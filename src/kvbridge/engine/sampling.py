"""Sampling parameters and the sampler: greedy argmax, or temperature / top-p with a seed.

Random sampling runs on the CPU with a per-request ``torch.Generator`` seeded from
``SamplingParams.seed``, so a seed gives the same tokens in any process, on any model device.
``compute_logprobs`` reports log-probabilities from the same logits ``sample`` drew from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbridge.engine.request import TokenLogprobs

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a uint64
MAX_LOGPROBS = 20  # most likely tokens reported per position (the OpenAI API's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; validated on construction."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report the sampled token's logprob and the top-k (0..20)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens: must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed: must be an int in [0, 2**64) or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        for tok in stops:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"stop_token_ids: {tok!r} is not a token id")
        object.__setattr__(self, "stop_token_ids", stops)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")
        k = self.logprobs
        if k is not None and (
            isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS
        ):
            raise ValueError(f"logprobs: must be an int in [0, {MAX_LOGPROBS}] or None, got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def position_seed(seed: int, position: int) -> int:
    """The seed of a request's draw for output token ``position``: ``seed`` itself for the
    first, a hash of both after. A draw depends only on the seed and the position, so a decode
    engine that starts at the second token (first-token handover) or a request recomputed after
    preemption draws what a monolithic engine draws."""
    if position == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's CPU generator: seeded when ``params.seed`` is set and sampling is random."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(params.seed)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` ``[n, vocab]``; row i uses ``params[i]``, ``generators[i]``.

    A request's generator must be reused across its steps (``make_generator`` once per request).
    A ``None`` generator with a random sampler uses torch's global RNG.
    """
    n = logits.shape[0]
    if len(params) != n or len(generators) != n:
        raise ValueError(
            f"sample: {n} logit rows but {len(params)} params and {len(generators)} generators"
        )
    if n == 0:
        return []
    out = logits.argmax(dim=-1).tolist()
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return out
    rows = logits[random_rows].to("cpu", torch.float32)
    for j, i in enumerate(random_rows):
        scaled = rows[j] / params[i].temperature
        if not torch.isfinite(scaled).all():  # a tiny temperature overflows: shift, in float64
            scaled = (rows[j] - rows[j].max()).double() / params[i].temperature
        probs = torch.softmax(scaled, dim=-1)
        if params[i].top_p < 1.0:
            probs = _top_p(probs, params[i].top_p)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out


def compute_logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], tokens: Sequence[int]
) -> list[TokenLogprobs | None]:
    """Per row of ``logits`` ``[n, vocab]``: the log-probability and rank of ``tokens[i]`` and
    the ``params[i].logprobs`` most likely tokens; ``None`` for rows that did not ask.

    The distribution is the model's raw one, ``log_softmax`` in float32 of the very logits
    ``sample`` drew from (before temperature and top-p), as vLLM reports by default and as the
    OpenAI API documents: a greedy and a sampled run of a prompt report the same numbers, and a
    decode server's can be compared with a monolithic server's. Nothing is recomputed.
    """
    n = logits.shape[0]
    if len(params) != n or len(tokens) != n:
        raise ValueError(
            f"compute_logprobs: {n} logit rows, {len(params)} params, {len(tokens)} tokens"
        )
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * n
    if not asked:
        return out
    logprobs = torch.log_softmax(logits[asked].to(torch.float32), dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in asked], device=logprobs.device)
    chosen = logprobs.gather(1, chosen_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=1) + 1
    k = min(max(params[i].logprobs or 0 for i in asked), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    top_values_l, top_ids_l = top_values.tolist(), top_ids.tolist()
    for row, i in enumerate(asked):
        want = params[i].logprobs or 0
        top = tuple(zip(top_ids_l[row][:want], top_values_l[row][:want], strict=True))
        out[i] = TokenLogprobs(tokens[i], chosen_l[row], ranks_l[row], top)
    return out


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly more likely tokens
    drop = before >= top_p
    drop[0] = False  # the most likely token stays, even if top_p underflows the dtype
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
