"""`ringfence doctor`'s check of the compiled data path: built, not built, or built from
older sources than the code importing it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: ``_pgscan`` resolves to an empty module (an extension built
# before a step the code now imports) and ``_link`` to none at all (never built).
_STALE_AND_MISSING = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys, types

    class Old(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "agent.protocols._pgscan":
                return importlib.machinery.ModuleSpec(name, self)
            if name == "audit._link":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
        def create_module(self, spec):
            return types.ModuleType(spec.name)
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Old())
    from agent.doctor import compiled_check
    check = compiled_check()
    print(check.ok)
    print(check.detail)
""")


def _doctor(source: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != "RINGFENCE_IMPL"} | env
    out = subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=environ,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.splitlines()


def test_built_modules_pass() -> None:
    ok, detail = _doctor("from agent.doctor import compiled_check\n"
                         "c = compiled_check()\nprint(c.ok)\nprint(c.detail)")
    assert ok == "True"
    assert detail == "agent/protocols/_pgscan, policy/_plainshape, audit/_link built"


def test_a_stale_build_is_told_apart_from_a_missing_one() -> None:
    ok, detail = _doctor(_STALE_AND_MISSING)
    assert ok == "False"
    assert "not built: audit/_link;" in detail
    assert "built from older sources: agent/protocols/_pgscan (cannot import name" in detail
    assert "policy/_plainshape" not in detail


def test_the_twins_chosen_on_purpose_say_so() -> None:
    ok, detail = _doctor("from agent.doctor import compiled_check\n"
                         "c = compiled_check()\nprint(c.ok)\nprint(c.detail)",
                         RINGFENCE_IMPL="python")
    assert ok == "False"
    assert detail.startswith("RINGFENCE_IMPL=python")
