"""Many requests through proxy + prefill + decode, some cancelled: ``python -m benchmarks.soak``.

One process runs a prefill server and a decode server (``kvbridge serve`` apps, each with a
MultiConnector of NixlConnector over real NIXL and a CPU offload tier small enough to evict),
the P/D proxy in front, and an asyncio client that keeps ``--concurrency`` requests in flight
and cancels ``--abort-fraction`` of them at a random moment. ``--faults 1`` injects, on D, a
READ that never completes, a failing READ post and a remote disconnect, and restarts P half-way
(``soak_faults``). Then it proves: every completed answer passes the logprob oracle
(``kvbridge.oracle``) against a monolithic engine, both engines are back where they started
within the lease + 1 s (no request, GPU block, CPU pin, lease, load, transfer handle or extra
dlist left), nothing was logged at ERROR, and every WARNING is of an expected kind. Same-run
baseline: the monolithic engine's requests/s on the same prompts, in-process (no HTTP, no P/D).
``--producer-seed`` other than 0 gives P other weights: the oracle's control (wrong KV).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass, field, fields

from benchmarks.soak_audit import EngineBaseline, LogAudit, engine_baseline, idle_problems
from benchmarks.soak_client import NO_ANSWER, Outcome, Restart, run_client
from benchmarks.soak_faults import FaultLog, FaultPlan
from benchmarks.soak_stack import ROLES, SoakStack, engine_kwargs
from kvbridge.bench import harness
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.sampling import SamplingParams
from kvbridge.oracle import TOP_K, Trace, check
from kvbridge.serve.server import ServerParts

logger = logging.getLogger(__name__)

# WARNING lines a clean soak may log: a CPU pool smaller than the GPU cache churns by design,
# and a client that leaves before the decode engine attached the producer lets a hold lapse.
EXPECTED_WARNINGS = (
    re.compile(r"CPU pool of \d+ blocks is smaller than the GPU cache"),
    re.compile(r"lease on \d+ blocks of \S+ lapsed"),
)
# ... and with injected faults: loads that fail closed (D recomputes), the restarted
# producer's lost side channel, and the proxy's fallback while P restarts.
FAULT_WARNINGS = (
    re.compile(r"injected (failure|disconnect)"),
    re.compile(r"KV load failed for \S+ from token \d+ \(policy recompute\)"),
    re.compile(r"load of \S+ failed: "),
    re.compile(r"is gone: the side channel"),
    re.compile(r"decode computes the prompt"),
)
_COUNTERS = (
    "prompt_tokens_by_source",
    "kv_offload_evictions",
    "kv_offload_total_bytes",
    "nixl_num_transfers",
    "nixl_num_kv_expired_reqs",
    "nixl_num_failed_transfers",
)


_MAY_BE_ZERO = ("seed", "producer_seed", "faults")


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 150
    concurrency: int = 8
    abort_fraction: float = 0.1
    stream_fraction: float = 0.8
    num_prompts: int = 32
    max_tokens: int = 6
    block_size: int = 4
    gpu_blocks: int = 40  # a few requests' worth: the prefix cache evicts
    cpu_blocks: int = 64  # a quarter of the prompts' blocks: the CPU tier evicts too
    lease_s: float = 2.0
    transfer_timeout_s: float = 3.0  # how long D waits for a READ (the stuck one) or handshake
    seed: int = 0
    producer_seed: int = 0  # P's weights; not 0: the oracle's control (wrong KV)
    faults: int = 0  # 1: inject FaultPlan.for_soak

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_fraction") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name}: must be in [0, 1], got {value}")
            if f.type == "int" and f.name not in _MAY_BE_ZERO and value < 1:
                raise ValueError(f"{f.name}: must be >= 1, got {value}")
        if self.lease_s <= 0.5:
            raise ValueError(
                f"lease_s: must be > 0.5 (heartbeats every 0.25 s), got {self.lease_s}"
            )


@dataclass(frozen=True)
class SoakResult:
    requests: int
    completed: int
    aborted: int
    wall_s: float
    ttft_s: list[float]
    baseline_rps: float
    mismatched: list[str] = field(default_factory=list)  # answers the oracle flags
    bad_status: list[str] = field(default_factory=list)  # unexpected HTTP answers
    leaks: list[str] = field(default_factory=list)
    unexpected_logs: list[str] = field(default_factory=list)
    lapsed_leases: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    max_logprob_diff: float = 0.0  # largest |logprob - monolithic's| over passing answers
    flagged_same_tokens: int = 0  # flagged answers whose tokens all equal monolithic's
    drain_s: dict[str, float] = field(default_factory=dict)  # role -> client end to idle
    faults: FaultLog | None = None  # what was injected

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    def ttft_percentile(self, q: float) -> float:
        """TTFT quantile ``q`` (0..1) of the completed streamed requests, in seconds."""
        ordered = sorted(self.ttft_s) or [float("nan")]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def problems(self) -> list[str]:
        return self.mismatched + self.bad_status + self.leaks + self.unexpected_logs


# -- the run ------------------------------------------------------------------------------------
def make_prompts(config: SoakConfig) -> list[list[int]]:
    """Four families of prompts sharing a prefix (cache and CPU-tier hits), 9-59 tokens."""
    rng = random.Random(config.seed)
    stems = [[rng.randrange(256) for _ in range(rng.randrange(8, 40))] for _ in range(4)]
    return [
        stems[i % 4] + [rng.randrange(256) for _ in range(rng.randrange(1, 21))]
        for i in range(config.num_prompts)
    ]


def _monolithic(config: SoakConfig, prompts: list[list[int]]) -> tuple[list[Trace], float]:
    """The oracle's reference per prompt, and the monolithic engine's requests/s on them."""
    with LLMEngine(EngineConfig(**engine_kwargs(config), num_gpu_blocks=512)) as engine:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up, not timed
        start = time.perf_counter()
        params = SamplingParams(max_tokens=config.max_tokens, ignore_eos=True, logprobs=TOP_K)
        outs = engine.generate(prompts, params)
        return [Trace.from_output(o) for o in outs], len(prompts) / (time.perf_counter() - start)


def _audit_idle(
    role: str, parts: ServerParts, base: EngineBaseline, deadline: float
) -> tuple[list[str], float]:
    """What ``role``'s engine holds once idle or at ``deadline`` (monotonic), and when that
    was (monotonic)."""
    while parts.loop.call(lambda e: e.has_unfinished_requests() or e.has_pending_transfers()):
        if time.monotonic() > deadline:
            break  # idle_problems names what is left
        time.sleep(0.02)
    idle_at = time.monotonic()
    return [f"{role}: {p}" for p in parts.loop.call(lambda e: idle_problems(e, base))], idle_at


def _counters(role: str, parts: ServerParts) -> dict[str, float]:
    """The counters that show which paths the soak took."""
    out: dict[str, float] = {}
    for family in parts.metrics.registry.collect():
        for s in family.samples:
            name = s.name.removeprefix("kvbridge:").removesuffix("_total")
            if name in _COUNTERS and s.value:
                label = s.labels.get("source") or s.labels.get("transfer_type")
                out[f"{role} {name}" + (f" ({label})" if label else "")] = s.value
    return out


def run_soak(config: SoakConfig) -> SoakResult:
    """Run the soak and audit the aftermath (see the module docstring)."""
    prompts = make_prompts(config)
    expected, baseline_rps = _monolithic(config, prompts)
    plan = FaultPlan.for_soak(config.requests) if config.faults else FaultPlan()
    audit = LogAudit(EXPECTED_WARNINGS + (FAULT_WARNINGS if plan.any else ()))
    # uvicorn's loggers do not propagate, and each server's config resets their handlers:
    # watch them once every server is configured.
    watched = [logging.getLogger(), logging.getLogger("uvicorn")]
    stack = SoakStack(config, plan)
    leaks: list[str] = []
    counters: dict[str, float] = {}
    drain: dict[str, float] = {}
    try:
        url = stack.start()
        bases = {r: stack.parts[r].loop.call(engine_baseline) for r in ROLES}
        for log in watched:
            log.addHandler(audit)
        restart = (
            Restart(plan.restart_after, stack.restart_producer) if plan.restart_after else None
        )
        start = time.perf_counter()
        outcomes = asyncio.run(run_client(url, config, prompts, restart))
        wall = time.perf_counter() - start
        ended = time.monotonic()
        for role in ROLES:  # the restarted P starts as empty as the first
            found, idle_at = _audit_idle(
                role, stack.parts[role], bases[role], ended + config.lease_s + 1.0
            )
            leaks += found
            drain[role] = idle_at - ended
            counters.update(_counters(role, stack.parts[role]))
    finally:
        leaks += stack.shutdown_leaks()
        for log in watched:
            log.removeHandler(audit)
    done = [o for o in outcomes if o.answer is not None]
    verdicts = [(o, check(expected[o.prompt], o.answer)) for o in done if o.answer is not None]
    flagged = [(o, v) for o, v in verdicts if not v.ok]
    return SoakResult(
        requests=config.requests,
        completed=len(done),
        aborted=sum(1 for o in outcomes if o.status is None),
        wall_s=wall,
        ttft_s=[o.ttft for o in done if o.ttft is not None],
        baseline_rps=baseline_rps,
        mismatched=[f"{o.label}: {v.problem}" for o, v in flagged],
        bad_status=_bad_status(outcomes),
        leaks=leaks,
        unexpected_logs=audit.unexpected(),
        lapsed_leases=audit.count(EXPECTED_WARNINGS[1]),
        counters=counters,
        max_logprob_diff=max((v.max_abs_diff for _, v in verdicts if v.ok), default=0.0),
        flagged_same_tokens=sum(
            1 for o, _ in flagged if o.answer and o.answer.token_ids == expected[o.prompt].token_ids
        ),
        drain_s=drain,
        faults=stack.faults if plan.any else None,
    )


def _bad_status(outcomes: list[Outcome]) -> list[str]:
    return [
        o.label if o.status == NO_ANSWER else f"{o.label}: HTTP {o.status}"
        for o in outcomes
        if o.answer is None and o.status is not None
    ]


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[SoakConfig, argparse.Namespace]:
    p = harness.parser("python -m benchmarks.soak", __doc__)
    for f in fields(SoakConfig):
        kind = int if f.type == "int" else float
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    args = p.parse_args(argv)
    known = {f.name for f in fields(SoakConfig)}
    try:
        return SoakConfig(**{k: v for k, v in vars(args).items() if k in known}), args
    except ValueError as e:
        p.error(str(e))
        raise


def report(config: SoakConfig, r: SoakResult) -> harness.Report:
    """One row per measure; the first 20 problems as notes."""
    title = (
        f"soak: proxy + P + D (tiny model, CPU), {r.requests} requests, "
        f"{config.concurrency} in flight, {config.abort_fraction:.0%} cancelled"
    )
    out = harness.Report("soak", title, ("measure", "value"))
    p50, p99 = r.ttft_percentile(0.5) * 1e3, r.ttft_percentile(0.99) * 1e3
    rows = [
        ("completed / cancelled by the client", f"{r.completed} / {r.aborted}"),
        ("requests/s through proxy + P + D", f"{r.requests_per_s:.1f}"),
        ("baseline: monolithic engine, in-process, requests/s", f"{r.baseline_rps:.1f}"),
        ("TTFT p50 / p99, streamed, ms", f"{p50:.0f} / {p99:.0f}"),
        ("completed answers the logprob oracle flags", str(len(r.mismatched))),
        ("largest logprob difference of a passing answer", f"{r.max_logprob_diff:.2g}"),
        *((f"{role}: idle after the client ended, s", f"{s:.2f}") for role, s in r.drain_s.items()),
        *((f"injected: {k}", str(v)) for k, v in _injected(r.faults).items()),
        ("unexpected HTTP answers", str(len(r.bad_status))),
        ("leaks after the run", str(len(r.leaks))),
        ("log lines at ERROR, or an unexpected WARNING", str(len(r.unexpected_logs))),
        ("leases that lapsed (client gone early)", str(r.lapsed_leases)),
        *((key, f"{value:,.0f}") for key, value in sorted(r.counters.items())),
    ]
    for measure, value in rows:
        out.add([measure, value], {"measure": measure, "value": value})
    out.notes += [f"problem: {line}" for line in r.problems[:20]]
    out.samples = {"ttft_s": r.ttft_s, "problems": r.problems, "counters": r.counters}
    return out


def _injected(log: FaultLog | None) -> dict[str, int]:
    if log is None:
        return {}
    return {"stuck READs": log.stuck, "failed posts": log.failed_posts,
            "remote disconnects": log.disconnects, "producer restarts": log.restarts}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    try:
        result = run_soak(config)
    except ImportError as e:
        print(f"soak: needs the NIXL package ({e})")
        return 2
    harness.emit([report(config, result)], args)
    return 0 if not result.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
