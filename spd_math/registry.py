"""A named registry: a tuple of names (what configs validate against and serialise) that also
maps each name to its implementation. Adding an entry is one line where the registry is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from spd_math.errors import SpdMathError

Entry = TypeVar("Entry")


class Registry(tuple, Generic[Entry]):
    """Names in registration order (a real tuple: `in`, iteration, `len`, equality and pickling
    work as for a tuple of strings), each mapped to an entry by `lookup`.

    Examples
    --------
    >>> registry = Registry("colour", {"red": 1, "blue": 2})
    >>> tuple(registry), "red" in registry, registry.lookup("blue")
    (('red', 'blue'), True, 2)
    """

    _entries: Mapping[str, Entry]
    _kind: str

    def __new__(cls, kind: str, entries: Mapping[str, Entry]) -> Registry[Entry]:
        registry = super().__new__(cls, tuple(entries))
        registry._entries = dict(entries)
        registry._kind = kind
        return registry

    def __reduce__(self):
        # Pickled and copied as the plain tuple of names it is to callers that store it.
        return (tuple, (tuple(self),))

    def lookup(self, name: str, error: type[SpdMathError] = SpdMathError, field: str | None = None) -> Entry:
        """The entry registered as `name`, or `error` naming the field, the value and the known names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise error(f"{field or self._kind}: expected one of {list(self)}, got {name!r}") from None

    def items(self) -> Iterator[tuple[str, Entry]]:
        return iter(self._entries.items())
