"""Fixtures for the attribution integration tests (root, netns, BPF)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attribution import Attributor
from agent.config import BpfSettings
from tests.conftest import require
from tests.integration.attribution.nsutil import NetNS, network_namespace

# The protected port of these tests' listeners.
PORT = 45432


@pytest.fixture
def root() -> None:
    require(os.geteuid() == 0, "root")
    for tool in ("ip", "setpriv"):
        require(shutil.which(tool) is not None, f"the {tool} command")


@pytest.fixture
def netns(root: None) -> Iterator[NetNS]:
    with network_namespace() as ns:
        yield ns


@pytest.fixture(scope="module")
def bpf_attributor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attributor]:
    """One BPF Attributor for the lookup tests of a module (compiling takes a second)."""
    require(os.geteuid() == 0, "root")
    state_dir: Path = tmp_path_factory.mktemp("state")
    attributor = Attributor(BpfSettings(mode="required"), [PORT], state_dir)
    attributor.start()
    try:
        yield attributor
    finally:
        attributor.stop()
