"""The compiled loops (setup.py) under test: the real ones, never a skip."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest


def compiled(module: str, name: str, in_use: bool) -> Any:
    """``name`` from the compiled ``module``, to check against its Python twin.

    ``./dev.sh setup`` (pip install -e .) and the packages build every extension, so a
    missing one fails the test; ``in_use`` is the flag saying the code runs it (it does
    not under ``RINGFENCE_IMPL=python``, the run of the unit tests on the twins).
    """
    try:
        extension = importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module.replace('.', '/')}.c is not built: run ./dev.sh setup")
    if os.environ.get("RINGFENCE_IMPL") != "python":
        assert in_use, f"{module} is built but its Python twin is in use"
    return getattr(extension, name)
