"""The audit package's exception hierarchy."""

from __future__ import annotations


class AuditError(Exception):
    """Base of every error raised by the audit package."""


class AuditUnavailable(AuditError):
    """The store cannot write now (disk or map full, closed, failing)."""


class UnknownEventType(AuditError):
    """An event type that the schema does not define."""


class InvalidEvent(AuditError):
    """An event with values msgpack cannot encode."""


class RecordDecodeError(AuditError):
    """Stored bytes that do not decode into an audit record."""


class CheckpointError(AuditError):
    """A checkpoint note that is malformed or whose signature does not verify."""


class ProofError(AuditError):
    """A Merkle proof that cannot be built or does not verify."""


class StoreCorrupt(AuditError):
    """The on-disk store is missing parts or is not a ringfence audit store."""
