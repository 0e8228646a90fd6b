"""LoadResults: what the consumer's reader reports about ended loads, until the worker asks."""

from __future__ import annotations

import logging

from kvbridge.nixl.metadata import RecvSpec

logger = logging.getLogger(__name__)


class LoadResults:
    """Runs in a consumer worker; owns the ended loads not yet reported to the engine."""

    def __init__(self) -> None:
        self._recving: set[str] = set()  # ended (received, failed or aborted)
        self._invalid: set[int] = set()  # block ids of failed loads
        self._failures: dict[str, str] = {}  # request id -> why its load failed
        self._failed_ids: set[str] = set()  # request ids of failed loads, until taken

    def failed(self, spec: RecvSpec, reason: str) -> None:
        """The load failed: its blocks are load errors, ``reason`` goes to the scheduler."""
        blocks = spec.all_local_block_ids
        logger.warning(
            "load of %s failed: %s; %d blocks marked as load errors",
            spec.request_id,
            reason,
            len(blocks),
        )
        self._invalid |= blocks
        self._failures[spec.request_id] = reason
        self._failed_ids.add(spec.request_id)

    def ended(self, request_id: str) -> None:
        self._recving.add(request_id)

    def take_recving(self) -> set[str]:
        out, self._recving = self._recving, set()
        return out

    def take_failed(self) -> set[str]:
        """Request ids of the loads that failed since the last call."""
        out, self._failed_ids = self._failed_ids, set()
        return out

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def take_failures(self) -> dict[str, str]:
        out, self._failures = self._failures, {}
        return out

    def clear(self) -> None:
        self._recving.clear()
        self._invalid.clear()
        self._failures.clear()
        self._failed_ids.clear()
