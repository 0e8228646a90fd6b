"""Whether a real NIXL package is installed, and the skip mark of tests that need one."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

from kvbridge.nixl.wrapper import NIXL_PACKAGES

HAVE_NIXL = any(find_spec(p) for p in NIXL_PACKAGES)
needs_nixl = pytest.mark.skipif(
    not HAVE_NIXL, reason=f"no NIXL package installed (tried {', '.join(NIXL_PACKAGES)})"
)
