"""tandem.sdk.tags.parse_tags: the one `key=value` tag parser (agent, fleet REST, console)."""

from __future__ import annotations

import pytest

from tandem.errors import ConfigError
from tandem.sdk.tags import parse_tags


def test_parses_key_value_pairs_keeping_empty_values_and_later_equals_signs() -> None:
    assert parse_tags(["a=b", "c=", "url=x=y", "a=b"]) == {"a": "b", "c": "", "url": "x=y"}
    assert parse_tags([]) == {}


@pytest.mark.parametrize(
    ("item", "problem"),
    [("site", "key=value"), ("=lab", "key=value"), (" =lab", "key=value")],
)
def test_refuses_an_item_without_a_key_naming_the_field(item: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_tags(["ok=1", item], "--tag")
    assert caught.value.field == "--tag" and repr(item) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_refuses_a_key_given_twice_with_different_values() -> None:
    with pytest.raises(ConfigError, match="'ring' given twice: 'a' and 'b'"):
        parse_tags(["ring=a", "ring=b"])
