"""Which NIXL transport a worker builds: real NIXL, the fake, or a caller's callable."""

from __future__ import annotations

from collections.abc import Callable

from kvbridge.nixl.settings import NixlSettings
from kvbridge.nixl.transport import NixlTransport

TransportFactory = Callable[[str], NixlTransport]


def make_transport_factory(settings: NixlSettings) -> TransportFactory:
    """``nixl_wrapper``: "nixl" (real NIXL), "fake" (``FakeNixlWrapper``) or a callable."""
    wrapper = settings.nixl_wrapper
    if callable(wrapper):
        return wrapper
    if wrapper == "fake":
        from kvbridge.nixl.fake import FakeNixlWrapper

        return lambda name: FakeNixlWrapper(name, **settings.fake_nixl)
    from kvbridge.nixl.wrapper import NixlWrapper

    return lambda name: NixlWrapper(
        name, backends=settings.backends, progress_delay_us=settings.progress_delay_us
    )
