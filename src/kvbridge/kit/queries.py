"""Questions an engine or a test asks of a connector's scheduler half about one request."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvbridge.connector.base import KVConnectorScheduler
from kvbridge.connector.multi_scheduler import MultiScheduler


@runtime_checkable
class SupportsRequestState(Protocol):
    """A scheduler half that can say whether it keeps state for a request (every built-in)."""

    def has_request_state(self, request_id: str) -> bool: ...


def has_request_state(connector: KVConnectorScheduler, request_id: str) -> bool:
    """Whether the scheduler half (and, for a MultiConnector, any child) still keeps state
    for ``request_id``: ``False`` for every request once it finished and its transfers drained.

    ``TypeError`` for a connector that cannot say (it does not implement
    ``has_request_state``).
    """
    if not isinstance(connector, SupportsRequestState):
        raise TypeError(
            f"{type(connector).__name__} cannot say whether it keeps state for a request "
            "(it has no has_request_state method)"
        )
    return connector.has_request_state(request_id)


def loading_child(connector: KVConnectorScheduler, request_id: str) -> str | None:
    """Name of the MultiConnector child whose match won ``request_id``'s load, from the match
    until the request finishes; ``None`` if no child matched. ``TypeError`` for a connector
    that is not a MultiConnector's scheduler half."""
    if not isinstance(connector, MultiScheduler):
        raise TypeError(f"{type(connector).__name__} is not a MultiConnector's scheduler half")
    return connector.loading_child(request_id)
