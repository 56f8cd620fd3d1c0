"""Exceptions of the chalkcompute SDK.

Every exception the SDK raises for a volume, a path or a version derives from
:class:`ChalkError`. Each class also derives from the built-in exception that
code outside the SDK expects (``FileNotFoundError`` for :class:`NotFound`,
and so on), so ``pandas`` and ``fsspec`` callers see the usual types.
"""

from __future__ import annotations

from typing import Iterable


class ChalkError(Exception):
    """Base class of every error raised by chalkcompute."""


class NotFound(ChalkError, FileNotFoundError):
    """A volume, lineage, version or path does not exist."""


class AlreadyExists(ChalkError, FileExistsError):
    """A volume, lineage or tag with that name already exists."""


class Conflict(ChalkError):
    """A sync changed the same paths as a version published since its base.

    ``paths`` lists the conflicting paths; it is empty when another writer
    published first and the sync may simply be retried.
    """

    def __init__(self, message: str, paths: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.paths: list[str] = list(paths)


class ReadOnly(ChalkError, PermissionError):
    """A write through a handle pinned to a version, which is immutable."""


class InvalidPath(ChalkError, ValueError):
    """A path that cannot be used: ``..`` components, a file where a directory
    is needed, or the reverse."""


class InvalidArgument(ChalkError, ValueError):
    """An invalid volume or lineage name, version id or other argument."""


class StoreUnavailable(ChalkError, OSError):
    """The store could not be opened, read or written."""


__all__ = [
    "AlreadyExists",
    "ChalkError",
    "Conflict",
    "InvalidArgument",
    "InvalidPath",
    "NotFound",
    "ReadOnly",
    "StoreUnavailable",
]
