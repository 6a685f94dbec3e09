"""Device tags written as `key=value`: the one parser for the agent, the fleet and the console.

A device announces its tags (`tandem agent run --tag site=lab`); rollouts select devices by
them (`tandem rollout start --tag ring=canary`); the REST API and the console filter by them
(`?tag=site=lab`). All of them read the same text the same way, so a tag that one accepts
the others accept too.
"""

from __future__ import annotations

from collections.abc import Iterable

from tandem.errors import ConfigError


def parse_tags(items: Iterable[str], field: str = "tag") -> dict[str, str]:
    """`["site=lab", "ring=canary"]` -> `{"site": "lab", "ring": "canary"}`.

    The value may be empty (`ring=`) and may hold `=`; the key may not be empty, and a key
    given twice with different values is refused rather than silently keeping the last.
    Raises `ConfigError` (a `ValueError`) naming `field` and the offending item.
    """
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(field, f"{item!r} is not key=value with a non-empty key")
        if tags.get(key, value) != value:
            raise ConfigError(field, f"tag {key!r} given twice: {tags[key]!r} and {value!r}")
        tags[key] = value
    return tags
