"""String-keyed registries: one per kind of pluggable thing (block, kind of data, optimizer, schedule).

Config leaves name registry keys, never Python classes, so a resolved config round-trips
through YAML. An unknown key is a :class:`ConfigError` that suggests the nearest name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kiln.errors import ConfigError

T = TypeVar("T")


def nearest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest spelling among ``choices``, or None when nothing is close."""
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A sentence fragment like " (did you mean 'lstm'?)", or "" when nothing is close."""
    guess = nearest(word, choices)
    return f" (did you mean {guess!r}?)" if guess else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ConfigError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; known: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items


BLOCKS: Registry = Registry("block")
KINDS: Registry = Registry("dataset")  # kinds of data, by the name data.dataset uses
OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")
