"""BoardReads: where a consumer's one-sided READs of producers' lease boards land.

A board READ copies one bucket (``BOARD_WAYS`` words, 64 bytes) of a producer's board into a
window of a small registered host buffer; ``lease_board.board_verdict`` reads the window. A
window is in use from the post until the READ's handle is released (a handle whose release
fails may still write into it: that window is never handed out again).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from kvbridge.connector.types import IntegrityError
from kvbridge.nixl.lease_board import BOARD_WAYS, BUCKET_BYTES
from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    DlistHandle,
    NixlTransport,
    NixlTransportError,
    XferHandle,
)

logger = logging.getLogger(__name__)

BOARD_WINDOWS = 64  # board READs in flight at once; a load that finds none free just asks


class BoardCheck(NamedTuple):
    """One load's board READ in flight."""

    handle: XferHandle
    window: int
    word: int  # the load's lease word
    posted_wall: float  # perf_counter() just before the post


class BoardReads:
    """Runs in a consumer worker; owns the registered windows board READs land in, and their
    dlist (one descriptor per window)."""

    def __init__(self, transport: NixlTransport, windows: int = BOARD_WINDOWS) -> None:
        if windows < 1:
            raise ValueError(f"BoardReads: windows must be >= 1, got {windows}")
        self._t = transport
        self.buf = np.zeros((windows, BOARD_WAYS), dtype=np.uint64)
        addr = int(self.buf.ctypes.data)
        self._reg = transport.get_reg_descs([(addr, self.buf.nbytes, 0, "")], "DRAM")
        transport.register_memory(self._reg)
        try:
            items = [(addr + w * BUCKET_BYTES, BUCKET_BYTES, 0) for w in range(windows)]
            self.dlist: DlistHandle = transport.prep_xfer_dlist(
                LOCAL_AGENT, transport.get_xfer_descs(items, "DRAM")
            )
        except BaseException:
            transport.deregister_memory(self._reg)
            raise
        self._free = list(range(windows - 1, -1, -1))
        self._lost: set[int] = set()  # windows whose READ's handle could not be released
        self._closed = False

    def take(self) -> int | None:
        """A zeroed window for a board READ, or None when all are in use."""
        if not self._free:
            return None
        window = self._free.pop()
        self.buf[window] = 0
        return window

    def bucket(self, window: int) -> npt.NDArray[np.uint64]:
        return self.buf[window]

    def give_back(self, window: int, *, released: bool = True) -> None:
        """The window's READ handle is released (else the window is lost until ``recover``)."""
        if released:
            self._free.append(window)
        else:
            self._lost.add(window)
            logger.error("board READ window %d lost: its transfer handle was not released", window)

    def recover(self, window: int) -> None:
        """A lost window's READ handle was released after all: the window is free again."""
        if window in self._lost:
            self._lost.discard(window)
            self._free.append(window)
            logger.info("board READ window %d recovered: its transfer handle was released", window)

    @property
    def num_taken(self) -> int:
        """Windows out of the free list (in use or lost)."""
        return len(self.buf) - len(self._free)

    def check_integrity(self, in_use: int) -> None:
        """``in_use`` loads hold a window; every other window is free or lost."""
        if self.num_taken != in_use + len(self._lost) or len(set(self._free)) != len(self._free):
            raise IntegrityError(
                f"BoardReads: {self.num_taken} windows taken, {in_use} in use, "
                f"{len(self._lost)} lost"
            )

    def close(self) -> None:
        """Release the dlist and the registration; idempotent."""
        if self._closed:
            return
        self._closed = True
        for release in (
            lambda: self._t.release_dlist_handle(self.dlist),
            lambda: self._t.deregister_memory(self._reg),
        ):
            try:
                release()
            except NixlTransportError as e:
                logger.error("releasing the board READ buffer failed: %s", e)
