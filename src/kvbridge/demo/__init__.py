"""``kvbridge demo``: P/D over NIXL with CPU offload, end to end on one machine.

Entry point: ``main(argv) -> int`` (``kvbridge demo``, ``make demo``).
"""

from __future__ import annotations

from kvbridge.demo.cli import main

__all__ = ["main"]
