"""The correctness oracle: an answer's per-token log-probabilities against a monolithic engine's.

Greedy tokens are a weak check of moved KV: with random weights attention is nearly uniform, and
a decode server fed another prompt's KV changed only 3 of 16 greedy tokens. The log-probability
of every token moves with it. So an answer is checked against a monolithic reference (the same
weights, no connector) token by token: the same token, and the same log-probability within
``TOLERANCE`` nats. Both come from the logits the sampler drew from (``SamplingParams.logprobs``
in the engine, ``logprobs: k`` on ``/v1/completions``).

``TOLERANCE`` (absolute, per token) comes from measured run-to-run noise, the reference engine
in float32 on CPU (2-core box, 2026-12-03; docs/reliability.md has the runs):

- noise: the same prompts through proxy + P + D (NIXL, CPU tier, continuous batching) against
  the monolithic engine, largest |logprob difference| of any token: 4.8e-7 (64 answers of 16
  tokens; the soak's answers, faults injected: the same); two monolithic runs: 0;
- signal: D fed the right prompt's KV computed by other weights (seed 1), smallest per-answer
  largest difference: 5.4e-3 (64 answers of 16 tokens; median 0.048), also in answers whose
  greedy tokens all matched.

1e-4 sits 200x above the noise and 50x below the smallest signal.

A different token is allowed only at a near tie: the served token is in the reference's top-k
with a log-probability within the tolerance of the reference's choice (and of the served one's);
the two continuations then legitimately diverge and comparison stops there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from kvbridge.engine.engine import EngineConfig
    from kvbridge.engine.request import RequestOutput

TOLERANCE = 1e-4  # nats, absolute, per token (see the module docstring)
TOP_K = 5  # alternatives the reference keeps per position, for near ties


class OracleError(ValueError):
    """An answer the oracle cannot judge: no log-probabilities, or lists of unequal length."""


@dataclass(frozen=True)
class Trace:
    """A greedy answer as the oracle sees it: token ids, each one's log-probability, and (for a
    reference) the most likely alternatives at each position (token id -> log-probability)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top: tuple[Mapping[int, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise OracleError(
                f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probabilities"
            )
        if self.top and len(self.top) != len(self.token_ids):
            raise OracleError(f"{len(self.token_ids)} tokens but {len(self.top)} top-k entries")

    @classmethod
    def from_output(cls, out: RequestOutput) -> Trace:
        """An engine's final output of a request made with ``SamplingParams(logprobs=k)``."""
        if out.logprobs is None:
            raise OracleError(f"request {out.request_id}: no logprobs (ask with logprobs=k)")
        return cls(
            tuple(out.token_ids),
            tuple(e.logprob for e in out.logprobs),
            tuple(dict(e.top) for e in out.logprobs),
        )

    @classmethod
    def from_choices(cls, choices: Iterable[Mapping[str, Any]]) -> Trace:
        """A ``/v1/completions`` choice made with ``logprobs: k``, whole or as its streamed
        chunks in order (each with ``token_ids`` and ``logprobs.token_logprobs``). Alternatives
        are not kept: the API names them by text, not id."""
        ids: list[int] = []
        logprobs: list[float] = []
        for choice in choices:
            new = list(choice.get("token_ids") or [])
            entry = choice.get("logprobs")
            values = list(entry.get("token_logprobs") or []) if entry else []
            if len(values) != len(new):
                raise OracleError(
                    f"a choice with {len(new)} token ids has {len(values)} token_logprobs "
                    "(was the request made with logprobs: k?)"
                )
            ids += (int(t) for t in new)
            logprobs += (float(v) for v in values)
        return cls(tuple(ids), tuple(logprobs))


class Verdict(NamedTuple):
    """What the oracle found: ``problem`` is None when the answer passes."""

    problem: str | None
    max_abs_diff: float  # largest |logprob difference| over the positions compared
    compared: int  # positions compared (up to a near tie, if any)

    @property
    def ok(self) -> bool:
        return self.problem is None


def check(expected: Trace, actual: Trace, tol: float = TOLERANCE) -> Verdict:
    """Judge ``actual`` against the reference ``expected`` (see the module docstring)."""
    if not (tol >= 0 and math.isfinite(tol)):
        raise OracleError(f"tolerance must be a finite number >= 0, got {tol!r}")
    worst = 0.0
    for i, (want, got) in enumerate(zip(expected.token_ids, actual.token_ids)):
        ref, lp = expected.logprobs[i], actual.logprobs[i]
        if want == got:
            diff = abs(ref - lp)
            worst = max(worst, diff)
            if not diff <= tol:  # NaN fails too
                why = f"token {i} ({got}): logprob {lp:.6f}, reference {ref:.6f} (tol {tol:g})"
                return Verdict(why, worst, i + 1)
            continue
        alt = expected.top[i].get(got) if expected.top else None
        if alt is not None and abs(alt - ref) <= tol and abs(alt - lp) <= tol:
            return Verdict(None, worst, i)  # a near tie: the continuations may differ from here
        return Verdict(
            f"token {i}: {got} (logprob {lp:.6f}), reference {want} (logprob {ref:.6f})",
            max(worst, abs(ref - lp)),
            i + 1,
        )
    if len(expected.token_ids) != len(actual.token_ids):
        n, m = len(actual.token_ids), len(expected.token_ids)
        return Verdict(f"{n} tokens, reference {m}", worst, min(n, m))
    return Verdict(None, worst, len(actual.token_ids))


def reference(
    prompts: Iterable[Sequence[int]],
    config: EngineConfig,
    *,
    max_tokens: int,
    top_k: int = TOP_K,
    ignore_eos: bool = True,
) -> dict[tuple[int, ...], Trace]:
    """prompt -> the greedy ``Trace`` of an ``LLMEngine`` built from ``config`` (which should have
    no connector), each distinct prompt run once."""
    from kvbridge.engine.engine import LLMEngine
    from kvbridge.engine.sampling import SamplingParams

    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    if not unique:
        return {}
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, logprobs=top_k, ignore_eos=ignore_eos
    )
    with LLMEngine(config) as engine:
        outputs = engine.generate([list(p) for p in unique], params)
    return {p: Trace.from_output(out) for p, out in zip(unique, outputs)}
