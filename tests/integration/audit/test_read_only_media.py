"""A copy of the audit trail on read-only media (an archive, evidence mounted read-only)
is read and verified as it is: the audit commands write nothing to the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from audit.checkpoint import Signer
from tests.conftest import require
from tests.unit.audit.conftest import make_log, session_events


@pytest.fixture
def read_only_copy(tmp_path: Path, signer: Signer) -> Iterator[Path]:
    """A trail written as the agent writes it, then mounted read-only elsewhere."""
    require(os.geteuid() == 0, "root (to mount a read-only bind mount)")
    require(shutil.which("mount") is not None, "mount(8)")
    written = tmp_path / "written"
    log = make_log(written, signer, checkpoint_every_records=4)
    session_events(log, "s1", statements=5)
    log.close()
    mnt = tmp_path / "evidence"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(written), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_trail_on_read_only_media_is_verified_and_read(
        read_only_copy: Path, key_path: Path) -> None:
    """`audit verify` and `audit tail` on a read-only mount: the same answers as on the
    original, and nothing asks to write there."""
    with pytest.raises(OSError):
        (read_only_copy / "probe").write_bytes(b"")  # (the mount is read-only indeed)

    def audit(*args: str) -> str:
        result = CliRunner().invoke(
            main, ["audit", "--path", str(read_only_copy), "--key-path", str(key_path), *args])
        assert result.exit_code == 0, result.output
        return str(result.output)

    assert audit("verify").startswith("ok:")
    records = [json.loads(line) for line in audit("tail", "-n", "100", "--json").splitlines()]
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[0]["type"] == "session.start" and records[0]["session_id"] == "s1"
    assert sum(r["type"] == "query" for r in records) == 5
