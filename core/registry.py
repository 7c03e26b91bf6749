"""One registry per extension point: methods, metrics, attacks, backends register by decorator."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name was looked up that nothing registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection filled by ``@registry.register("name")`` where each item is defined."""

    def __init__(self, kind: str) -> None:
        """Create an empty registry; ``kind`` names it in error messages (e.g. "unlearning method")."""
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the item called ``name``, or raise an error listing the known names."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def in_order(self) -> list[T]:
        """All registered items in the order they registered (e.g. report columns, whose order is the table's)."""
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def import_submodules(package: str, path: Iterable[str], skip: Container[str] = ()) -> list[str]:
    """Import every module of a package (but ``skip``), so the entries defined in them register themselves:
    adding a method, attack, metric or backend is adding one file, with no list of modules to keep."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if m.name not in skip)
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
