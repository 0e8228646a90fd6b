"""Connector metadata across a process boundary: msgpack that names each value's class.

Plain msgspec decodes a field typed as a base struct (``MultiConnectorMetadata.metadata`` is
``tuple[KVConnectorMetadata, ...]``) as the base and drops the children's fields. Here every
metadata value travels as ``{"kvb": "module:Class", "f": fields}``, its nested metadata values
likewise, and decodes back to that class; other fields decode by their declared types. Only
classes already imported by the decoding process (the connector it built) are accepted.
"""

from __future__ import annotations

from typing import Any, TypeVar, get_origin

import msgspec

from kvbridge.connector.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

_BASES = (KVConnectorMetadata, KVConnectorWorkerMetadata, KVConnectorHandshakeMetadata)
_TAG = "kvb"
T = TypeVar("T")


class MetadataCodecError(ValueError):
    """A payload that does not decode to known connector metadata."""


def encode_metadata(value: Any) -> bytes:
    """msgpack bytes of a metadata value (metadata values nested in it keep their classes)."""
    return msgspec.msgpack.encode(_to_wire(value))


def decode_metadata(payload: bytes, expected: type[T] = KVConnectorMetadata) -> T:  # type: ignore[assignment]
    """The value ``encode_metadata`` encoded; ``MetadataCodecError`` unless an ``expected``."""
    try:
        value = _from_wire(msgspec.msgpack.decode(payload), None)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as e:
        raise MetadataCodecError(f"connector metadata: {e}") from e
    if not isinstance(value, expected):
        raise MetadataCodecError(
            f"connector metadata: expected {expected.__name__}, got {type(value).__name__}"
        )
    return value


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _to_wire(value: Any) -> Any:
    if isinstance(value, _BASES):
        fields = msgspec.structs.fields(value)
        return {
            _TAG: _name(type(value)),
            "f": {f.name: _to_wire(getattr(value, f.name)) for f in fields},
        }
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(node: Any, declared: Any) -> Any:
    if isinstance(node, dict) and _TAG in node:
        cls = _known_classes().get(node[_TAG])
        if cls is None:
            raise MetadataCodecError(
                f"connector metadata: unknown class {node[_TAG]!r} (is its connector built here?)"
            )
        values = node.get("f", {})
        kwargs = {
            f.name: _from_wire(values[f.name], f.type)
            for f in msgspec.structs.fields(cls)
            if f.name in values
        }
        return cls(**kwargs)
    if isinstance(node, list) and any(_is_tagged(v) for v in node):
        items = [_from_wire(v, None) for v in node]
        return tuple(items) if get_origin(declared) is tuple else items
    if isinstance(node, dict) and any(_is_tagged(v) for v in node.values()):
        return {k: _from_wire(v, None) for k, v in node.items()}
    return node if declared is None else msgspec.convert(node, declared)


def _is_tagged(node: Any) -> bool:
    return isinstance(node, dict) and _TAG in node


def _known_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    todo: list[type] = list(_BASES)
    while todo:
        cls = todo.pop()
        found[_name(cls)] = cls
        todo.extend(cls.__subclasses__())
    return found
