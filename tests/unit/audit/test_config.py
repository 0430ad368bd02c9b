"""The [audit] configuration table: defaults, values read, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]


def test_packaged_defaults_match_dataclass() -> None:
    """The documented packaging/ringfence.toml [audit] values equal the built-in defaults."""
    from agent.config import AuditSettings

    assert load_config(ROOT / "packaging" / "ringfence.toml").audit == AuditSettings()


def test_values_are_read() -> None:
    """Every audit key is read into AuditSettings."""
    cfg = parse_config(
        {
            "audit": {
                "path": "/srv/audit",
                "key_path": "/srv/key",
                "origin": "db1.example/audit",
                "checkpoint_every_records": 100,
                "checkpoint_every_seconds": 5,
                "checkpoint_export": "stdout",
                "segment_max_bytes": 1 << 24,
                "segment_max_age_seconds": 3600,
                "queue_size": 1024,
                "batch_max_records": 512,
                "batch_max_delay_ms": 2,
                "retry_interval_ms": 100,
            }
        }
    )
    a = cfg.audit
    assert a.path == Path("/srv/audit") and a.key_path == Path("/srv/key")
    assert a.origin == "db1.example/audit" and a.checkpoint_export == "stdout"
    assert a.checkpoint_every_seconds == 5.0 and a.batch_max_records == 512


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"queue_size": 0}, "audit.queue_size"),
        ({"batch_max_records": 10**9}, "audit.batch_max_records"),
        ({"checkpoint_every_records": "many"}, "audit.checkpoint_every_records"),
        ({"origin": "has space"}, "audit.origin"),
        ({"checkpoint_export": "relative/file"}, "audit.checkpoint_export"),
        ({"segment_max_bytes": 10}, "audit.segment_max_bytes"),
        ({"unknown_key": 1}, "audit.unknown_key"),
    ],
)
def test_bad_values_name_the_key(table: dict[str, object], key: str) -> None:
    """A bad or unknown [audit] value is rejected with a message naming its key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"audit": table})
