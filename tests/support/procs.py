"""Child processes whose /proc entries a test reads."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path


def wait_until_running(pid: int, argv: Sequence[str], timeout: float = 30.0) -> None:
    """Wait until ``pid`` runs ``argv``: until its exec is complete, /proc shows the parent's
    environment, or an empty command line, instead of its own."""
    want = b"".join(arg.encode() + b"\0" for arg in argv)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/cmdline").read_bytes() != want:
        assert time.monotonic() < deadline, f"process {pid} never ran {list(argv)}"
        time.sleep(0.005)
