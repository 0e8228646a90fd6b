"""RecomputeGuard: a disk hit is read back only when that is expected to beat recomputing it.

Three online estimates, all torch-free and clocked by an injectable ``clock``:

- disk reads, bytes/s: one sample per completed read batch, timed by the worker as the
  batch's busy time: the union of its blocks' I/O spans on the threads (``busy_seconds``), so
  neither queueing behind an earlier batch's backlog nor threads reading in parallel skew it;
- disk writes, bytes/s: the same for each step's writes (the write-through of stored blocks).
  Until a read is measured the write rate stands in for the read rate, on the assumption that
  the disk reads at least as fast as it writes, as most disks (SSDs, HDDs, network and virtual
  disks) do; a disk that reads slower than it writes may be read until its first read batch
  is measured. With buffered I/O (``use_page_cache``) a write may end in the page cache, so
  this prior is optimistic there, as reading unmeasured always was;
- recompute, tokens/s: one sample per engine step that computed at least ``min_step_tokens``
  tokens, timed from ``build_connector_meta`` (the step starts) to ``update_connector_output``
  (it ran). Smaller steps are left out: below a few hundred tokens a GPU step is bound by
  reading the weights, not by compute, so its time hardly depends on its tokens and their
  tokens/s understates the marginal prefill rate (a 8B model in bf16 on an H100/H200 reaches
  its FLOP/byte ridge, ~200-300, at about that many tokens). Understating recompute is the
  unsafe direction here: it makes a slow disk look worth it. The step's fixed cost is paid by
  both choices (a read-back still runs a step for the prompt's last token), so only the
  marginal rate matters.

A hit is skipped when ``bytes / read_rate > tokens / recompute_rate * margin``. The margin
(0.8 by default) leaves room for what the read rate leaves out: the CPU->GPU load of the read
blocks and the engine step more a read-back costs (the request is asked again).

The estimates outlive the process (``rates.py``): ``rates()`` / ``seed()`` carry them to and
from ``guard_rates.json`` in the disk tier's directory, so a restarted server weighs its first
disk hits against what the previous run measured instead of reading them unmeasured.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.8
MIN_STEP_TOKENS = 256
# After this long without a read sample while skipping, one lookup reads anyway (a probe), so
# a disk that got faster (a busy neighbour gone, a warm page cache) is noticed again.
PROBE_AFTER_S = 60.0
ALPHA = 0.2  # EWMA weight of a new sample
_MAX_PENDING_STEPS = 4  # steps built but not yet ended (async scheduling keeps one or two)
_LOG_EVERY_S = 60.0


class RateEstimate:
    """A running rate (units per second): an EWMA of ``log(rate)`` over the samples.

    Averaging in log space bounds what one outlier does (with ``alpha`` 0.2 a sample 10x off
    moves the estimate 1.58x, either way) while a lasting change is followed within a few
    samples. A sample without time or amount teaches nothing and is dropped.
    """

    def __init__(self, alpha: float = ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"RateEstimate: alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.samples = 0
        self._log: float | None = None

    def add(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:
            return
        x = math.log(amount / seconds)
        self._log = x if self._log is None else self._log + self.alpha * (x - self._log)
        self.samples += 1

    @property
    def rate(self) -> float | None:
        """Units per second; None before the first sample."""
        return None if self._log is None else math.exp(self._log)

    def seconds_for(self, amount: float) -> float | None:
        """Predicted seconds for ``amount`` units; None before the first sample."""
        rate = self.rate
        return None if rate is None else amount / rate

    def seed(self, rate: float, samples: int) -> None:
        """Start from ``rate`` (a previous run's estimate, ``samples`` samples); later samples
        move it as they would have moved that run's estimate."""
        if not (rate > 0 and math.isfinite(rate)) or samples < 1:
            raise ValueError(f"RateEstimate.seed: bad rate {rate!r} or samples {samples!r}")
        self._log = math.log(rate)
        self.samples = samples


@dataclass(frozen=True)
class Verdict:
    """A lookup's decision. ``reason``: ``faster`` or ``slower`` (both known), ``unmeasured``
    (a rate is still unknown: the disk is taken), ``probe`` (slower, taken to measure again).
    ``from_writes``: ``read_s`` was predicted from the write rate (no read measured yet)."""

    take: bool
    reason: str
    read_s: float | None = None
    recompute_s: float | None = None
    from_writes: bool = False


@dataclass(frozen=True)
class Rates:
    """The guard's estimates as plain numbers (None: never measured), to persist and seed."""

    read_bytes_per_s: float | None = None
    read_samples: int = 0
    write_bytes_per_s: float | None = None
    write_samples: int = 0
    recompute_tokens_per_s: float | None = None
    recompute_samples: int = 0

    @property
    def total_samples(self) -> int:
        return self.read_samples + self.write_samples + self.recompute_samples


class RecomputeGuard:
    """Runs in the scheduler (``DiskTier``); decides whether a disk hit is worth reading.

    Feed it ``step_started(tokens)`` / ``step_ended()`` once per engine step, in order, and
    ``read_done(nbytes, seconds)`` / ``write_done(nbytes, seconds)`` per completed read / write
    batch; ask ``decide(nbytes, tokens)``. ``seed(rates)`` starts it from a previous run's
    ``rates()``. The clock is read only while measuring and deciding, never at construction.
    """

    def __init__(
        self,
        *,
        margin: float = DEFAULT_MARGIN,
        min_step_tokens: int = MIN_STEP_TOKENS,
        probe_after_s: float = PROBE_AFTER_S,
        alpha: float = ALPHA,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if margin <= 0:
            raise ValueError(f"RecomputeGuard: margin must be > 0, got {margin}")
        self.margin = margin
        self.min_step_tokens = min_step_tokens
        self.probe_after_s = probe_after_s
        self.clock = clock
        self.read = RateEstimate(alpha)  # bytes/s
        self.write = RateEstimate(alpha)  # bytes/s: the read rate's prior
        self.recompute = RateEstimate(alpha)  # tokens/s
        self._pending: deque[tuple[float, int]] = deque()  # (built at, tokens) per step
        self._last_end: float | None = None
        # A read sample, or a probe, or (nothing read yet in this run) the first skip was then.
        self._last_read_at: float | None = None
        self._noted_unmeasured = False
        self._logged_at: float | None = None

    # -- measurements -------------------------------------------------------------------------
    def step_started(self, num_tokens: int) -> None:
        """An engine step computing ``num_tokens`` tokens was built (``build_connector_meta``)."""
        self._pending.append((self.clock(), num_tokens))
        while len(self._pending) > _MAX_PENDING_STEPS:  # outputs went missing: never pair them
            self._pending.popleft()

    def step_ended(self) -> None:
        """The oldest step built ran (``update_connector_output``).

        It started when built or, with asynchronous scheduling (the next step is built while
        one runs), when the step before it ended, whichever came later.
        """
        now = self.clock()
        last, self._last_end = self._last_end, now
        if not self._pending:
            return
        built, tokens = self._pending.popleft()
        started = built if last is None else max(built, last)
        if tokens >= self.min_step_tokens:
            self.recompute.add(tokens, now - started)

    def read_done(self, nbytes: int, seconds: float) -> None:
        """A batch of disk reads ended: ``nbytes`` read in ``seconds`` of busy time."""
        self.read.add(nbytes, seconds)
        self._last_read_at = self.clock()

    def write_done(self, nbytes: int, seconds: float) -> None:
        """A batch of disk writes ended: ``nbytes`` written in ``seconds`` of busy time."""
        self.write.add(nbytes, seconds)

    # -- persistence --------------------------------------------------------------------------
    def rates(self) -> Rates:
        r, w, c = self.read, self.write, self.recompute
        return Rates(r.rate, r.samples, w.rate, w.samples, c.rate, c.samples)

    def seed(self, rates: Rates) -> None:
        """Start each estimate this run has not measured yet from ``rates``."""
        for est, rate, samples in (
            (self.read, rates.read_bytes_per_s, rates.read_samples),
            (self.write, rates.write_bytes_per_s, rates.write_samples),
            (self.recompute, rates.recompute_tokens_per_s, rates.recompute_samples),
        ):
            if est.rate is None and rate is not None:
                est.seed(rate, max(1, samples))

    # -- decision -----------------------------------------------------------------------------
    def decide(self, nbytes: int, num_tokens: int) -> Verdict:
        """Whether to read ``nbytes`` from disk rather than recompute ``num_tokens`` tokens."""
        read_s = self.read.seconds_for(nbytes)
        from_writes = read_s is None and self.write.rate is not None
        if from_writes:  # no read measured yet: the disk reads at least as fast as it writes
            read_s = self.write.seconds_for(nbytes)
        recompute_s = self.recompute.seconds_for(num_tokens)
        if read_s is None or recompute_s is None:
            if not self._noted_unmeasured:
                self._noted_unmeasured = True
                logger.info(
                    "disk tier: recompute guard has no %s measured yet; disk hits are read "
                    "until it has (prefill steps of >= %d tokens time recompute)",
                    "disk read or write rate" if read_s is None else "recompute rate",
                    self.min_step_tokens,
                )
            return Verdict(True, "unmeasured", read_s, recompute_s, from_writes)
        if read_s <= recompute_s * self.margin:
            return Verdict(True, "faster", read_s, recompute_s, from_writes)
        now = self.clock()
        if self._last_read_at is None:
            self._last_read_at = now  # nothing read in this run: probe an interval from now
        elif now - self._last_read_at >= self.probe_after_s:
            self._last_read_at = now  # one probe per interval, not one per lookup
            return Verdict(True, "probe", read_s, recompute_s, from_writes)
        if self._logged_at is None or now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            logger.info(
                "disk tier: skipping a disk hit of %d tokens: reading %.1f MiB would take "
                "~%.1f ms (%.2f GB/s%s), recomputing ~%.1f ms (%.0f tokens/s, margin %.2f)",
                num_tokens,
                nbytes / 2**20,
                read_s * 1e3,
                nbytes / read_s / 1e9,
                ", the write rate: no read measured yet" if from_writes else "",
                recompute_s * 1e3,
                self.recompute.rate or 0.0,
                self.margin,
            )
        return Verdict(False, "slower", read_s, recompute_s, from_writes)
