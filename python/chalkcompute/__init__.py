"""chalkcompute: the Python SDK of Chalk volumes.

Volumes are persistent, versioned file trees. Every write call publishes one
immutable version; versions can be listed, read, diffed and forked into
lineages. The store is chosen like the ``chalk`` command chooses it:
``CHALK_HOME`` (default ``~/.local/share/chalk``) and ``CHALK_STORE``
(default ``file://$CHALK_HOME/objects``).

``chalk://VOLUME[@VERSION]/PATH`` URLs work with fsspec, pandas and pyarrow
through :class:`chalkcompute.filesystem.ChalkFileSystem`.
"""

from .errors import (
    AlreadyExists,
    ChalkError,
    Conflict,
    InvalidArgument,
    InvalidPath,
    NotFound,
    ReadOnly,
    StoreUnavailable,
)
from .sandbox import ExecResult, Image, Sandbox, SandboxClient, SandboxError
from .volume import BatchUpload, Change, FileEntry, Version, Volume, VolumeFile

__all__ = [
    "AlreadyExists",
    "BatchUpload",
    "ChalkError",
    "Change",
    "Conflict",
    "ExecResult",
    "FileEntry",
    "Image",
    "InvalidArgument",
    "InvalidPath",
    "NotFound",
    "ReadOnly",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "StoreUnavailable",
    "Version",
    "Volume",
    "VolumeFile",
]
