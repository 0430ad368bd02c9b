"""Policy loading: validation errors name file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy import PolicyError, load_policy, parse_policy

PACKAGED = Path(__file__).resolve().parents[3] / "packaging" / "policy.toml"


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="p.toml")
    return info.value


def test_packaged_policy_loads() -> None:
    """The default policy shipped in packaging/ validates."""
    p = load_policy(PACKAGED)
    assert len(p.version) == 64 and p.defaults.unidentified == "allow"


def test_toml_syntax_error_has_line_and_column() -> None:
    """A TOML syntax error reports tomllib's line and column."""
    e = _error('[[rule]]\nid = "a"\neffect = \n')
    assert (e.line, e.column) == (3, 10)
    assert str(e).startswith("p.toml:3:10: ")


def test_unknown_effect_points_at_its_key() -> None:
    """An invalid effect is reported at the line and column of the effect key."""
    e = _error('[[rule]]\nid = "a"\neffect = "allow"\n\n[[rule]]\nid = "b"\n  effect = "explode"\n')
    assert (e.line, e.column) == (7, 3)
    assert "rule[1].effect" in e.message and "explode" in e.message


def test_unknown_key_in_unless_table_is_located() -> None:
    """An unknown key inside [rule.unless] is reported on its own line."""
    text = '[[rule]]\nid = "a"\neffect = "block"\n[rule.unless]\nclasses = ["read"]\ncolour = "red"\n'
    e = _error(text)
    assert e.line == 6 and "unknown key" in e.message


def test_undefined_subject_set_is_rejected() -> None:
    """A rule naming a subject set that is not defined fails at that key."""
    e = _error('[[rule]]\nid = "a"\neffect = "allow"\nsubjects = ["dbas"]\n')
    assert e.line == 4 and "[subjects.dbas]" in e.message


def test_duplicate_rule_id_is_rejected() -> None:
    """Two rules with one id are an error at the second id."""
    e = _error('[[rule]]\nid = "a"\neffect = "allow"\n[[rule]]\nid = "a"\neffect = "deny"\n')
    assert e.line == 5 and "already used" in e.message


def test_allow_with_statement_conditions_is_rejected() -> None:
    """allow cannot look at statements (use block with unless)."""
    e = _error('[[rule]]\nid = "a"\neffect = "allow"\nclasses = ["read"]\n')
    assert e.line == 3 and "use block" in e.message


def test_unknown_flag_class_and_detector_are_rejected() -> None:
    """Values outside the known flags, classes and detectors are errors at their key."""
    assert _error('[[rule]]\nid = "a"\neffect = "block"\nflags = ["dorp"]\n').line == 4
    assert _error('[[rule]]\nid = "a"\neffect = "block"\nclasses = ["rd"]\n').line == 4
    e = _error('[[rule]]\nid = "a"\neffect = "mask"\ndetectors = ["emial"]\n')
    assert e.line == 4 and "emial" in e.message


def test_record_rule_needs_a_level() -> None:
    """A record rule without a level is reported at its table."""
    e = _error('[defaults]\nrecord = "metadata"\n\n[[rule]]\nid = "r"\neffect = "record"\n')
    assert e.line == 4


def test_bad_time_window_is_rejected() -> None:
    """Malformed hours and unknown time zones fail at the time key."""
    e = _error('[[rule]]\nid = "a"\neffect = "block"\ntime = { hours = "25:00-26:00" }\n')
    assert e.line == 4
    e = _error('[[rule]]\nid = "a"\neffect = "block"\ntime = { timezone = "Mars/Base" }\n')
    assert "Mars/Base" in e.message


def test_bad_regex_is_rejected() -> None:
    """A statement pattern that is not a regular expression fails at its key."""
    e = _error('[subjects.x]\ngroups = ["g"]\n[[rule]]\nid = "a"\neffect = "block"\npattern = "("\n')
    assert e.line == 6 and "regular expression" in e.message


def test_multiline_string_does_not_confuse_locations() -> None:
    """Lines inside a multi-line string are not mistaken for keys or tables."""
    text = '[[rule]]\nid = "a"\nreason = """\n[[rule]]\neffect = "x"\n"""\neffect = "nope"\n'
    assert _error(text).line == 7


def test_missing_file_is_reported() -> None:
    """An unreadable policy file is a PolicyError naming the file."""
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy("/nonexistent/policy.toml")


def test_version_is_the_sha256_of_the_bytes() -> None:
    """The policy version changes with any byte of the file."""
    a = parse_policy('[defaults]\nrecord = "metadata"\n')
    b = parse_policy('[defaults]\nrecord = "metadata" \n')
    assert a.version != b.version
