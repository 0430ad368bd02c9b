"""The audit unit tests' key fixtures, for the tests here that write a trail."""

from tests.unit.audit.conftest import key_path, signer  # noqa: F401 (fixtures)
