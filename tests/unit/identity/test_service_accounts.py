"""Service accounts match on every declared criterion: unit, cgroup prefix, exe, uid."""

from __future__ import annotations

from agent.config import ServiceAccountConfig
from agent.identity.service_accounts import match_service_account
from tests.unit.identity.conftest import process, service_process


def test_matches_on_all_declared_criteria() -> None:
    """A unit + exe account matches its service and records each compared fact."""
    account = ServiceAccountConfig("etl", unit="etl.service", exe="/usr/bin/python3.11")
    match = match_service_account([account], service_process())
    assert match is not None and match.account is account
    assert match.evidence == (
        "unit etl.service = etl.service",
        "exe /usr/bin/python3.11 = /usr/bin/python3.11",
    )
    assert match_service_account([account], service_process(exe="/usr/bin/perl")) is None


def test_cgroup_prefix_is_on_path_boundaries() -> None:
    """A cgroup prefix covers its subtree but not siblings that share a name prefix."""
    account = ServiceAccountConfig("etl", cgroup="/system.slice/etl.service")
    assert match_service_account([account], service_process()) is not None
    sub = service_process(cgroup="/system.slice/etl.service/worker")
    assert match_service_account([account], sub) is not None
    sibling = service_process(cgroup="/system.slice/etl.service-old")
    assert match_service_account([account], sibling) is None


def test_uid_and_order() -> None:
    """Accounts are tried in order; a uid-only account matches any process of that uid."""
    by_unit = ServiceAccountConfig("etl", unit="etl.service")
    by_uid = ServiceAccountConfig("batch", uid=1000)
    match = match_service_account([by_unit, by_uid], process())
    assert match is not None and match.account.name == "batch"
    assert match.account.identity_subject == "service:batch"
    assert match_service_account([by_unit, by_uid], None) is None
