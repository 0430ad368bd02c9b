"""The tamper-evident audit trail: schema, LMDB store, Merkle tree, checkpoints, readers."""

from audit.checkpoint import Checkpoint, Signer, Verifier
from audit.errors import (
    AuditError,
    AuditUnavailable,
    CheckpointError,
    InvalidEvent,
    ProofError,
    RecordDecodeError,
    StoreCorrupt,
    UnknownEventType,
)
from audit.log import AuditLog
from audit.schema import EVENT_TYPES, Record

__all__ = [
    "EVENT_TYPES",
    "AuditError",
    "AuditLog",
    "AuditUnavailable",
    "Checkpoint",
    "CheckpointError",
    "InvalidEvent",
    "ProofError",
    "Record",
    "RecordDecodeError",
    "Signer",
    "StoreCorrupt",
    "UnknownEventType",
    "Verifier",
]
