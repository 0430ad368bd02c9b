"""The [identity] section and [protect.credentials]: read into settings, bad values named."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[3]

EXAMPLE = """
[identity]
env_var = "MY_TOKEN"
on_finding = "flag"
leeway_seconds = 10
automation_subjects = ["ci-*"]
required = true

[[identity.issuers]]
issuer = "https://idp.example.com"
audience = "ringfence"
jwks_file = "/etc/ringfence/idp.jwks"
groups_claim = "groups"

[[identity.issuers]]
issuer = "https://token.actions.githubusercontent.com"
audience = "ringfence"
discovery = true
subject_kind = "automation"

[[identity.service_accounts]]
name = "etl"
unit = "etl.service"
uid = 998

[identity.subject_users]
"alice@example.com" = "alice"

[[protect]]
name = "postgres"
port = 5432

[protect.credentials]
user = "app"
password_file = "/etc/ringfence/secrets/postgres-app"
"""


ISSUER = '[[identity.issuers]]\nissuer = "https://x"\naudience = "a"\ndiscovery = true\n'
PROTECT = '[[protect]]\nname = "pg"\n[protect.credentials]\nuser = "a"\n'


def parse(text: str) -> Any:
    return parse_config(tomllib.loads(text))


def test_example_reads() -> None:
    """The documented keys read into IdentitySettings and the service's credentials."""
    config = parse(EXAMPLE)
    identity = config.identity
    assert [i.issuer for i in identity.issuers] == [
        "https://idp.example.com",
        "https://token.actions.githubusercontent.com",
    ]
    first, second = identity.issuers
    assert first.jwks_file == Path("/etc/ringfence/idp.jwks") and first.groups_claim == "groups"
    assert first.subject_claim == "sub" and first.algorithms == ("RS256", "ES256", "EdDSA")
    assert second.discovery and second.subject_kind == "automation"
    assert (identity.env_var, identity.on_finding, identity.leeway_seconds) == ("MY_TOKEN", "flag", 10)
    assert identity.required and identity.automation_subjects == ("ci-*",)
    assert identity.service_accounts[0].uid == 998
    assert identity.local_user_for("alice@example.com") == "alice"
    credentials = config.protect[0].credentials
    assert credentials is not None and credentials.user == "app" and credentials.method == "auto"


def test_defaults() -> None:
    """Without an [identity] section nothing is trusted and identity is not required."""
    identity = parse("").identity
    assert identity.issuers == () and identity.env_var == "RINGFENCE_TOKEN"
    assert identity.on_finding == "refuse" and not identity.required


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('[[identity.issuers]]\nissuer = "https://x"\naudience = "a"\n', "exactly one of jwks_file"),
        (
            '[[identity.issuers]]\nissuer = "http://idp.example.com"\naudience = "a"\ndiscovery = true\n',
            "https:// URL",
        ),
        (
            ISSUER + 'algorithms = ["HS256"]\n',
            "'HS256' is not allowed",
        ),
        ('[[identity.issuers]]\nissuer = "https://x"\ndiscovery = true\n', "audience: required"),
        ('[identity]\non_finding = "ignore"\n', "on_finding: must be one of"),
        ('[[identity.service_accounts]]\nname = "x"\n', "at least one of unit, cgroup, exe, uid"),
        ("[identity]\ntypo = 1\n", "identity.typo: unknown key"),
        (
            '[[protect]]\nname = "pg"\n[protect.credentials]\nuser = "app"\n',
            "set password_file or password_env",
        ),
        (
            PROTECT + 'password_env = "X"\nmethod = "plain"\n',
            "method: must be one of",
        ),
    ],
)
def test_bad_values_are_named(snippet: str, message: str) -> None:
    """Each invalid identity setting is rejected with a message naming the key."""
    with pytest.raises(ConfigError, match=message):
        parse(snippet)


def test_duplicate_issuers() -> None:
    """The same issuer listed twice is rejected."""
    one = '[[identity.issuers]]\nissuer = "https://x"\naudience = "a"\ndiscovery = true\n'
    with pytest.raises(ConfigError, match="listed twice"):
        parse(one + one)


def test_default_config_file_still_reads() -> None:
    """The shipped packaging/ringfence.toml (with the commented identity examples) is valid."""
    parse((ROOT / "packaging" / "ringfence.toml").read_text())
