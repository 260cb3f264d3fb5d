"""Errors raised by the store.

Each error subclasses both :class:`StoreError` and the builtin a caller would expect, so
``except FileNotFoundError`` or ``except KeyError`` keep working for code that does not know the store.
"""

from __future__ import annotations

from collections.abc import Iterable


class StoreError(Exception):
    """Base class of every error raised by ``store``."""


class RunNotFoundError(StoreError, FileNotFoundError):
    """A run directory, or a file a run needs, does not exist."""


class CorruptRunError(StoreError, ValueError):
    """A run file exists but is damaged or missing a part; the message names the file."""


class SchemaVersionError(StoreError, ValueError):
    """A run was written by a newer version of the store than this one."""


class ConfigMismatchError(StoreError, ValueError):
    """A stored configuration differs from the one asked for; the message shows both values."""


class UnknownExampleError(StoreError, KeyError):
    """Example ids that are not in the store.

    Raised as ``UnknownExampleError(split, ids)``; called with a single argument, that argument is taken as
    the whole message (``split`` is then None and ``ids`` empty).

    Attributes:
        split: The split that was searched (``"train"`` or ``"test"``), or None.
        ids: The unknown example ids, in the order first asked.
    """

    def __init__(self, split: str, ids: Iterable[int] | None = None) -> None:
        if ids is None:
            self.split: str | None = None
            self.ids: tuple[int, ...] = ()
            self._text = str(split)
        else:
            self.split = split
            self.ids = tuple(int(i) for i in ids)
            shown = list(self.ids[:20])
            more = f" (and {len(self.ids) - 20} more)" if len(self.ids) > 20 else ""
            self._text = f"unknown example ids in split {split!r}: {shown}{more}"
        super().__init__(self._text)

    def __str__(self) -> str:
        # KeyError.__str__ repr-quotes its argument; show the plain message instead.
        return self._text
