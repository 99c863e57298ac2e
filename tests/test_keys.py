"""The key rules (DESIGN §1): the one-regex fast path of validate_key accepts exactly the keys
the rule-by-rule checks accept, so a key is never valid on one path and invalid on the other."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from artifactfs.errors import InvalidKey
from artifactfs.models import MAX_KEY_BYTES, check_key_rules, validate_key

# Characters that exercise every rule: valid ones, the separator, dots, and a few invalid ones.
_ALPHABET = "ab9_.-/ \x00é"


def _accepts(check: Callable[[str], str], key: str) -> bool:
    try:
        check(key)
    except InvalidKey:
        return False
    return True


def _accepted(key: str) -> bool:
    return _accepts(validate_key, key)


def _accepted_by_rules(key: str) -> bool:
    return _accepts(check_key_rules, key)


@given(st.text(alphabet=_ALPHABET, max_size=12))
def test_fast_path_agrees_with_the_rules_on_short_keys(key: str) -> None:
    assert _accepted(key) == _accepted_by_rules(key)


@given(st.lists(st.sampled_from(["a", ".", "..", "...", "x" * 255, "x" * 256, ""]),
                min_size=1, max_size=6))
def test_fast_path_agrees_with_the_rules_on_components(parts: list[str]) -> None:
    key = "/".join(parts)
    assert _accepted(key) == _accepted_by_rules(key)


def test_length_limits() -> None:
    longest = "/".join(["x" * 255] * 3 + ["y" * 254, "z"])
    assert len(longest) == MAX_KEY_BYTES
    assert validate_key(longest) == longest
    for bad in (longest + "z", "x" * 256, "a/" + "x" * 256):
        assert not _accepted(bad)
        assert not _accepted_by_rules(bad)
