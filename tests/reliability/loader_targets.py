"""Targets for the module-path connector loader tests: one connector, and things that are not.

Every construction or call is recorded in ``CALLS``, so a test can prove the loader touched
only what the config named.
"""

from __future__ import annotations

from typing import Any

from kvbridge.config import TransferConfig
from kvbridge.connector.noop import NoOpConnector, NoOpScheduler
from kvbridge.connector.types import KVCacheSpec

CALLS: list[str] = []


class RecordingScheduler(NoOpScheduler):
    """Runs in the scheduler; moves nothing, records that it was built."""

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        CALLS.append("RecordingConnector.scheduler")


class RecordingConnector(NoOpConnector):
    scheduler_cls = RecordingScheduler


class NotAConnector:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CALLS.append("NotAConnector")


def build_scheduler(*args: Any, **kwargs: Any) -> None:
    CALLS.append("build_scheduler")


NOT_A_CLASS = "RecordingConnector"
