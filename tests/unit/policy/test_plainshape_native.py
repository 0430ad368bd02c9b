"""The compiled shape key of plain texts (policy/_plainshape.c) answers exactly as its Python twin."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import examples
from tests.support.native import compiled

classify = importlib.import_module("policy.classify")


def native() -> Any:
    return compiled("policy._plainshape", "plain", classify.NATIVE_SHAPE)


# Statement-like ASCII: words, digit runs of any length next to letters, dots and
# underscores, every ASCII blank str.isspace() knows, semicolons, and now and then a
# character that makes a text not plain (or not ASCII).
_pieces = st.one_of(
    st.sampled_from(["SELECT", "x", "t1", "_", ".", ",", "(", ")", "=", "+", "-", "/", "*", ";",
                     "e", "E", "0x", "id", "a.b", "--", "/*", "'", '"', "$", "\\", "é", "\x00"]),
    st.integers(0, 10**12).map(str),
    st.text(alphabet="0123456789", min_size=1, max_size=12),
    st.text(alphabet=" \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", min_size=1, max_size=3),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=4),
)


@settings(max_examples=examples(3000), deadline=None)
@given(st.lists(_pieces, max_size=16).map("".join))
def test_same_key_as_python(text: str) -> None:
    plain = native()
    assert plain(text) == classify._plain_text_py(text)


def test_keys_of_pgbench_and_edge_texts() -> None:
    plain = native()
    assert plain("SELECT abalance FROM pgbench_accounts WHERE aid = 5;") == (
        b"pSELECT abalance FROM pgbench_accounts WHERE aid = \x00i;", 0, 51)
    # Ten digits are a bigint to PostgreSQL, not an integer literal; digits in names stay.
    assert plain(" select t1.c2, 1234567890, 7 ;\n") == (
        b"p select t1.c2, 1234567890, \x00i ;\n", 1, 29)
    assert plain("select 1; select 2") is None
    assert plain(" ; ") is None
    assert plain("select 'a'") is False
    assert plain("select 1 -- note") is False
    assert plain("select ü") is False
    with pytest.raises(TypeError):
        plain(b"select 1")
