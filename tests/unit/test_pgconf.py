"""Reading values as PostgreSQL reads them."""

from __future__ import annotations

import pytest

from agent.pgconf import parse_bool


@pytest.mark.parametrize("word", ["true", "t", "TRU", "yes", "y", "Ye", "on", "ON", "1"])
def test_true_words_and_their_prefixes(word: str) -> None:
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["false", "f", "FAL", "no", "n", "off", "of", "OFF", "0"])
def test_false_words_and_their_prefixes(word: str) -> None:
    assert parse_bool(word) is False


@pytest.mark.parametrize("word", ["", "o", "onn", "offf", "2", "10", "truex", "database", " on"])
def test_anything_else_is_not_a_boolean(word: str) -> None:
    """"o" could be on or off, so PostgreSQL takes neither; nor are spaces trimmed."""
    assert parse_bool(word) is None
