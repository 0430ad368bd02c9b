"""Config loading: defaults, the packaged file, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_packaged_default_config_is_valid() -> None:
    """packaging/ringfence.toml loads and protects PostgreSQL on 5432 via 15432."""
    config = load_config(REPO / "packaging" / "ringfence.toml")
    (service,) = config.protect
    assert (service.name, service.protocol, service.port, service.listen_port) == (
        "postgres", "postgres", 5432, 15432)
    assert config.audit.path == Path("/var/lib/ringfence/audit")
    assert config.agent.max_prepared_bytes == 256 * 1024 * 1024


def test_environment_variable_chooses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RINGFENCE_CONFIG is used when --config is not given."""
    path = tmp_path / "c.toml"
    path.write_text('[audit]\npath = "/tmp/x"\n')
    monkeypatch.setenv("RINGFENCE_CONFIG", str(path))
    assert load_config().audit.path == Path("/tmp/x")


@pytest.mark.parametrize(
    "data, key",
    [
        ({"agent": {"log_levle": "info"}}, "agent.log_levle: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"protect": [{"name": "pg", "port": 70000}]}, "protect[0].port"),
        ({"protect": [{"name": "pg", "port": "5432"}]}, "protect[0].port: expected int"),
        ({"protect": [{"name": "pg", "protocol": "mongo"}]}, "protect[0].protocol"),
        ({"protect": [{"port": 5432}]}, "protect[0].name: required"),
        ({"protect": [{"name": "pg", "port": 5432, "listen_port": 5432}]}, "protect[0].listen_port"),
        ({"protect": [{"name": "a", "port": 5432}, {"name": "a", "port": 5433}]}, "protect[1].name"),
        ({"protect": [{"name": "pg", "port": 5432, "extra": 1}]}, "protect[0].extra: unknown key"),
        ({"agent": {"listen_addresses": ["nope"]}}, "agent.listen_addresses[0]"),
        ({"bpf": {"mode": "sometimes"}}, "bpf.mode"),
        ({"agent": {"workers": 0}}, 'agent.workers: must be "auto" or a number from 1 to 64'),
        ({"agent": {"workers": "all"}}, "agent.workers"),
        ({"agent": {"workers": True}}, "agent.workers"),
        ({"agent": {"workers": 65}}, "agent.workers"),
        ({"agent": {"balance": "round-robin"}}, "agent.balance"),
        ({"agent": {"max_prepared_bytes": 100}}, "agent.max_prepared_bytes: must be at least 1024"),
        ({"redirect": {"method": "tproxy"}}, "redirect.method: must be one of auto, nat, sk_lookup"),
        ({"agent": {"fail_closed": True}, "redirect": {"method": "sk_lookup"}},
         'agent.fail_closed = true needs redirect.method = "nat"'),
        ({"audit": {"path": 3}}, "audit.path: expected str"),
        ({"protect": [{"name": "pg", "keepalive": {"idle": "1min"}}]}, "protect[0].keepalive.idle"),
        ({"protect": [{"name": "pg", "keepalive": {"count": -1}}]}, "protect[0].keepalive.count"),
        ({"protect": [{"name": "pg", "keepalive": {"probes": 3}}]},
         "protect[0].keepalive.probes: unknown key"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], key: str) -> None:
    """Each bad key or value is rejected with a message naming it."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert key in str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """A missing file and a TOML syntax error both give a message naming the file."""
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_workers_is_a_count_or_auto() -> None:
    """[agent] workers: "auto" (stored as 0, one per CPU up to 4, at least 1) or a count."""
    from agent.workers import AUTO_MAX, event_loops

    assert parse_config({}).agent.workers == 0
    assert parse_config({"agent": {"workers": "auto"}}).agent.workers == 0
    assert parse_config({"agent": {"workers": 3}}).agent.workers == 3
    assert event_loops(3) == 3
    assert 1 <= event_loops(0) <= AUTO_MAX


def test_balance_is_least_sessions_unless_hash_is_asked_for() -> None:
    """[agent] balance: new connections to the loop with the fewest sessions by default."""
    assert parse_config({}).agent.balance == "least-sessions"
    assert parse_config({"agent": {"balance": "hash"}}).agent.balance == "hash"
