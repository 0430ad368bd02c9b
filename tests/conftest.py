"""Shared test configuration.

Integration tests need root, network namespaces, iptables, BPF and PostgreSQL.
Outside CI a missing capability skips them; with CI=true it fails them, so a
CI run can never pass by skipping.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, what: str) -> None:
    """Skip (or in CI, fail) the calling test unless ``condition`` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide {what}", pytrace=False)
    pytest.skip(f"needs {what}")


@pytest.fixture(scope="session", autouse=True)
def _no_agent_outlives_the_run() -> Iterator[None]:
    """An agent that a failing test left running is stopped when the run ends."""
    yield
    from tests.support.agent import stop_leftovers

    stop_leftovers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)
