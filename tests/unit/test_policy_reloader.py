"""The agent's policy reloads: what is recorded, and when the session workers follow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.daemon import PolicyReloader
from policy import PolicyHolder

ALLOW_ALL = '[[rule]]\nid = "all"\neffect = "allow"\n'
BLOCK_SELECT = ALLOW_ALL + '[[rule]]\nid = "no-select"\neffect = "block"\nkinds = ["SELECT"]\n'


class Records:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, type: str, event: dict[str, Any]) -> None:
        self.events.append((type, event))


def _write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def test_workers_follow_loaded_reloads_only(tmp_path: Path) -> None:
    """A changed or unchanged file is passed on to the workers; a broken one is not (each
    would log the same error), and every reload is recorded with its outcome."""
    f = tmp_path / "policy.toml"
    _write(f, ALLOW_ALL, 0)
    holder = PolicyHolder(f)
    first = holder.version
    records, signalled = Records(), []
    reloader = PolicyReloader(holder, records, lambda: signalled.append(holder.version))

    _write(f, BLOCK_SELECT, 1)
    reloader.reload()
    second = holder.version
    assert second != first and signalled == [second]

    _write(f, BLOCK_SELECT + "[[rule\n", 2)
    reloader.reload()
    assert holder.version == second and signalled == [second]

    _write(f, BLOCK_SELECT, 3)
    reloader.reload()
    assert signalled == [second, second]

    effects = [(e["effect"], e["previous_version"], e["policy_version"]) for t, e in records.events
               if t == "policy.decision"]
    assert effects == [("reload", first, second), ("reload_rejected", second, second),
                       ("reload", second, second)]
