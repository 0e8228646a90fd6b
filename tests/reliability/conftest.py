"""Fixtures of the reliability suite: a resource ledger, and no thread left behind by any test."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from reliability.invariants import ResourceLedger, assert_no_new_threads


@pytest.fixture(autouse=True)
def no_new_threads() -> Iterator[None]:
    """Whatever a test starts, it stops: no thread of its own outlives it."""
    before = {t.ident for t in threading.enumerate()}
    yield
    assert_no_new_threads(before)


@pytest.fixture
def ledger() -> Iterator[ResourceLedger]:
    """Track engines with ``ledger.track``; at teardown they are idle, clean and shut down."""
    led = ResourceLedger()
    yield led
    led.close()
