"""``guard_rates.json``: the recompute guard's estimates, kept next to the records they weigh.

The file lives in the disk tier's namespace directory (one per model, dtype, layout and shapes:
``DIR/<model>_<digest>/``), so a restarted server with the same model starts from the rates
its previous run measured, and the first disk hits after a restart are weighed like later ones
instead of read unmeasured. Format (JSON, one object)::

    {"format": "kvbridge-disk-guard-rates", "version": 1, "saved_at": <unix seconds>,
     "read_bytes_per_s": <float|null>, "read_samples": <int>,
     "write_bytes_per_s": <float|null>, "write_samples": <int>,
     "recompute_tokens_per_s": <float|null>, "recompute_samples": <int>}

Written to a temporary name and renamed over the file (``os.replace``), at most once per
``SAVE_EVERY_S`` of the guard's clock while samples arrive, and at the scheduler's shutdown.
Servers sharing the directory overwrite each other's file: the last writer wins, and each
server's own measurements take over from the seed within a few samples. A missing, unreadable,
corrupt or foreign file (another format or version, a rate that is not a positive finite
number) is ignored with a debug log: the guard then starts unmeasured, as without a file.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from kvbridge.offload.disk.guard import Rates, RecomputeGuard

logger = logging.getLogger(__name__)

RATES_FILE = "guard_rates.json"
FORMAT: Final = "kvbridge-disk-guard-rates"
VERSION: Final = 1
SAVE_EVERY_S = 5.0

_Rate = Annotated[float, msgspec.Meta(gt=0)] | None
_Count = Annotated[int, msgspec.Meta(ge=0)]


class SavedRates(msgspec.Struct, frozen=True):
    """The file's content (decoded typed: a wrong type or a missing field is a foreign file)."""

    format: Literal["kvbridge-disk-guard-rates"]
    version: Literal[1]
    saved_at: float
    read_bytes_per_s: _Rate
    read_samples: _Count
    write_bytes_per_s: _Rate
    write_samples: _Count
    recompute_tokens_per_s: _Rate
    recompute_samples: _Count

    def rates(self) -> Rates:
        return Rates(
            self.read_bytes_per_s,
            self.read_samples,
            self.write_bytes_per_s,
            self.write_samples,
            self.recompute_tokens_per_s,
            self.recompute_samples,
        )


def load_rates(path: Path) -> Rates | None:
    """The rates saved at ``path``; None (logged at debug) when there are none to trust."""
    try:
        data = path.read_bytes()
    except OSError as e:
        logger.debug("disk tier: no guard rates from %s (%s)", path, e)
        return None
    try:
        saved = msgspec.json.decode(data, type=SavedRates)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        logger.debug("disk tier: ignoring guard rates in %s (%s)", path, e)
        return None
    rates = saved.rates()
    values = (rates.read_bytes_per_s, rates.write_bytes_per_s, rates.recompute_tokens_per_s)
    if any(v is not None and not math.isfinite(v) for v in values):
        logger.debug("disk tier: ignoring guard rates in %s (a rate is not finite)", path)
        return None
    return rates


def save_rates(path: Path, rates: Rates) -> bool:
    """Write ``rates`` to ``path`` atomically (a temporary file renamed over it); whether it
    was written (a failure is logged at debug: the rates are a hint, never required)."""
    saved = SavedRates(
        FORMAT,
        VERSION,
        time.time(),
        rates.read_bytes_per_s,
        rates.read_samples,
        rates.write_bytes_per_s,
        rates.write_samples,
        rates.recompute_tokens_per_s,
        rates.recompute_samples,
    )
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{RATES_FILE}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(saved), indent=1))
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("disk tier: could not save guard rates to %s (%s)", path, e)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False
    return True


class GuardRatesStore:
    """Seeds a guard from ``path`` and saves its rates back, rate-limited on its clock."""

    def __init__(self, path: Path, every_s: float = SAVE_EVERY_S) -> None:
        self.path = path
        self.every_s = every_s
        self._saved_at: float | None = None  # guard clock of the last save
        self._saved_samples = 0  # samples the file holds (as far as this process knows)

    def seed(self, guard: RecomputeGuard) -> Rates | None:
        """Seed ``guard`` from the file; the rates seeded, or None."""
        rates = load_rates(self.path)
        if rates is None:
            return None
        guard.seed(rates)
        self._saved_samples = guard.rates().total_samples
        logger.info(
            "disk tier: recompute guard starts from %s: read %s, write %s, recompute %s",
            self.path,
            _rate(rates.read_bytes_per_s, 1e9, "GB/s"),
            _rate(rates.write_bytes_per_s, 1e9, "GB/s"),
            _rate(rates.recompute_tokens_per_s, 1.0, "tokens/s"),
        )
        return rates

    def maybe_save(self, guard: RecomputeGuard, *, force: bool = False) -> bool:
        """Save when the guard learnt something since the last save and (unless ``force``)
        at least ``every_s`` passed on its clock; whether a write was attempted."""
        rates = guard.rates()
        if rates.total_samples == self._saved_samples:
            return False
        if not force:
            now = guard.clock()
            if self._saved_at is not None and now - self._saved_at < self.every_s:
                return False
            self._saved_at = now
        self._saved_samples = rates.total_samples  # a failed write is not retried each step
        save_rates(self.path, rates)
        return True


def _rate(value: float | None, unit: float, name: str) -> str:
    return "unmeasured" if value is None else f"{value / unit:.3g} {name}"
