"""SQL classification against the statement corpus (corpus.toml)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from policy.classify import CLASSES, FLAGS, Classifier, classify

CORPUS = tomllib.loads((Path(__file__).parent / "corpus.toml").read_text("utf-8"))["case"]


def _id(case: dict[str, Any]) -> str:
    return case["sql"][:60] or "<empty>"


def test_corpus_is_large_enough() -> None:
    """The corpus holds at least 150 statements."""
    assert len(CORPUS) >= 150


@pytest.mark.parametrize("case", CORPUS, ids=_id)
def test_corpus(case: dict[str, Any]) -> None:
    """Each corpus statement gets the expected kind, class, flags and objects."""
    c = classify(case["sql"])
    if case.get("parse_error"):
        assert c.parse_error is not None
        assert c.statements == ()
        return
    assert c.parse_error is None
    got = [s for s in c.statements]
    assert len(got) == len(case["expect"]), [s.kind for s in got]
    for s, expected in zip(got, case["expect"], strict=True):
        kind, klass, flags, *objects = expected
        assert klass in CLASSES and set(flags) <= set(FLAGS)
        assert (s.kind, s.statement_class, sorted(s.flags)) == (kind, klass, sorted(flags))
        if objects:
            assert list(s.objects) == objects[0]


def test_statement_text_is_sliced_per_statement() -> None:
    """Each statement of a chain carries its own text, also after multibyte characters."""
    c = classify("SELECT 'ü'; DROP TABLE users")
    assert [s.text for s in c.statements] == ["SELECT 'ü'", "DROP TABLE users"]


def test_parse_error_carries_the_parser_message() -> None:
    """Unparseable text reports PostgreSQL's syntax error."""
    assert "syntax error" in (classify("DROPP TABLE x").parse_error or "")


def test_deep_nesting_does_not_exhaust_the_stack() -> None:
    """Deeply nested input is classified or rejected, never a RecursionError."""
    c = classify("SELECT " + "(" * 900 + "1" + ")" * 900)
    assert c.parse_error is not None or c.statements[0].kind == "SELECT"


def test_classifier_caches_by_text_within_bounds() -> None:
    """The classifier returns the cached result for a repeated text and stays bounded."""
    cl = Classifier(max_entries=2)
    first = cl("SELECT 1")
    assert cl("SELECT 1") is first
    assert cl.hits == 1
    cl("SELECT 2")
    cl("SELECT 3")
    assert len(cl) == 2
    assert cl("SELECT 1") is not first


def test_classifier_does_not_cache_huge_texts() -> None:
    """Texts above the size limit are classified but not kept."""
    cl = Classifier(max_text=10)
    cl("SELECT 1234567890")
    assert len(cl) == 0
