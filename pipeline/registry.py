"""One registry shape for everything chosen by name in a config: methods, sources, extractors and stages
(timm's `register_model` / `create_model`, in one small class).

An entry is an object, or a lazy `"module"` / `"module:attribute"` string imported on first use, so that
naming a source or an extractor does not import every other one (and torch) up front.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


class Registry:
    """Entries by name, for config key `key` (e.g. "train.method"), of a `kind` (e.g. "method")."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Callable[[Any], Any] | Any:
        """Registers `entry` under `name` and returns it; without `entry`, returns a decorator that does so.
        Raises ValueError when `name` is taken by another entry."""
        def add(obj: Any) -> Any:
            known = self._entries.get(name)
            lazy_of_obj = isinstance(known, str) and getattr(obj, "__module__", None) == known.partition(":")[0]
            if name in self._entries and known is not obj and not lazy_of_obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def names(self) -> list[str]:
        """Returns the registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str) -> None:
        """Raises ValueError naming `key`, the unknown `name` and the known names, unless `name` is registered."""
        if name not in self._entries:
            raise ValueError(f"{self.key}: unknown {self.kind} {name!r} (known: {', '.join(self.names())})")

    def get(self, name: str) -> Any:
        """Returns the entry registered under `name`, importing a lazy `module[:attribute]` entry (a module that
        registers an object under `name` when imported replaces its lazy entry)."""
        self.check(name)
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            loaded = importlib.import_module(module)
            if not isinstance(self._entries[name], str):  # importing it registered the real entry
                return self._entries[name]
            entry = getattr(loaded, attribute) if attribute else loaded
        return entry

    def spec(self, name: str) -> Any:
        """Returns the raw entry (a lazy entry stays its `module[:attribute]` string)."""
        self.check(name)
        return self._entries[name]
