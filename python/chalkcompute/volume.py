"""Volumes: named, versioned file trees.

A :class:`Volume` handle is bound to a lineage (``main`` unless given) or, when
it comes from :meth:`Volume.at_version`, pinned to one version and read-only.
Each call on a lineage handle reads the lineage head at that moment. Every
write call publishes exactly one new version; :meth:`Volume.batch_upload`
groups many writes into one version.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Optional, Union

from . import _native
from .errors import ChalkError, InvalidArgument, NotFound

#: Bytes read from a file object and written to the volume at a time.
STREAM_CHUNK_BYTES = 1 << 20

#: Read buffer of the streams that :meth:`Volume.open` returns.
OPEN_BUFFER_BYTES = 1 << 20

Data = Union[bytes, bytearray, memoryview, str, IO[bytes]]


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


@dataclass(frozen=True)
class Version:
    """An immutable snapshot of a volume, published by one sync or put."""

    id: str
    #: Position in its lineage, starting at 1.
    seq: int
    parent: Optional[str]
    lineage: str
    created_at: datetime
    message: Optional[str]
    #: Regular files in the version and the sum of their sizes.
    files: int
    bytes: int

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> "Version":
        return cls(**{**raw, "created_at": _time(raw["created_at"])})


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory listing."""

    #: Path relative to the volume root, such as ``data/train.csv``.
    path: str
    size: int
    #: ``"file"``, ``"dir"`` or ``"symlink"`` (or a special kind such as ``"fifo"``).
    type: str
    mtime: datetime
    mode: int
    #: Target of a symlink, else ``None``.
    target: Optional[str] = None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> "FileEntry":
        return cls(**{**raw, "mtime": _time(raw["mtime"])})


@dataclass(frozen=True)
class Change:
    """One path that differs between two versions."""

    path: str
    #: ``"added"``, ``"removed"``, ``"modified"`` or ``"renamed"``.
    kind: str
    old_path: Optional[str]
    #: ``"file"``, ``"dir"`` or ``"symlink"``.
    type: str
    old_size: Optional[int]
    new_size: Optional[int]


VersionLike = Union[Version, str]


def _version_id(version: VersionLike) -> str:
    if isinstance(version, Version):
        return version.id
    if isinstance(version, str):
        return version
    raise TypeError(f"expected a Version or a version id string, got {type(version).__name__}")


def _write_data(batch: "_native.Batch", path: str, data: Data) -> int:
    """Write ``data`` as the whole file at ``path`` of ``batch``; return its size."""
    if isinstance(data, bytes):
        return batch.put_bytes(path, data)
    if isinstance(data, str):
        return batch.put_bytes(path, data.encode("utf-8"))
    if isinstance(data, (bytearray, memoryview)):
        return batch.put_bytes(path, bytes(data))
    if hasattr(data, "read"):
        return _write_stream(batch, path, data)
    raise TypeError(
        f"cannot write {type(data).__name__} to {path!r}: pass bytes, str or a binary file object"
    )


def _write_stream(batch: "_native.Batch", path: str, source: IO[bytes]) -> int:
    ino = batch.begin_file(path)
    offset = 0
    while True:
        chunk = source.read(STREAM_CHUNK_BYTES)
        if chunk is None:
            raise InvalidArgument(f"file object for {path!r} returned None from read(); use a blocking file object")
        if isinstance(chunk, str):
            raise TypeError(f"file object for {path!r} is in text mode; open it in binary mode ('rb')")
        if not chunk:
            return offset
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        batch.write_at(ino, offset, chunk)
        offset += len(chunk)


class Volume:
    """A handle on a volume, bound to a lineage or pinned to a version.

    ``Volume(name)`` opens an existing volume on lineage ``main`` and raises
    :class:`~chalkcompute.errors.NotFound` when it does not exist, unless
    ``create_if_missing=True``. The store is the one that ``CHALK_HOME`` and
    ``CHALK_STORE`` select, as for the ``chalk`` command.
    """

    _core: "_native.VolumeCore"

    def __init__(self, name: str, lineage: str = "main", *, create_if_missing: bool = False) -> None:
        self._core = _native.open_volume(name, lineage, create_if_missing)

    @classmethod
    def _wrap(cls, core: "_native.VolumeCore") -> "Volume":
        volume = cls.__new__(cls)
        volume._core = core
        return volume

    # -- volumes ---------------------------------------------------------

    @classmethod
    def create(cls, name: str) -> "Volume":
        """Create a volume with an empty first version and return a handle on ``main``.

        Raises :class:`~chalkcompute.errors.AlreadyExists` when it exists.
        """
        return cls._wrap(_native.create_volume(name))

    @staticmethod
    def list() -> list["Volume"]:
        """Return a handle on ``main`` of every volume in the store, by name."""
        return [Volume(name) for name, _latest in _native.list_volumes()]

    def delete(self) -> None:
        """Delete the volume with all its lineages and versions."""
        self._core.delete()

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def lineage(self) -> Optional[str]:
        """The lineage of this handle, or ``None`` for a handle pinned to a version."""
        return self._core.lineage

    @property
    def version(self) -> Optional[Version]:
        """The pinned version of a handle from :meth:`at_version`, else ``None``."""
        raw = self._core.pinned_version
        return None if raw is None else Version._from_dict(raw)

    @property
    def read_only(self) -> bool:
        """True for a handle pinned to a version."""
        return self._core.lineage is None

    def __repr__(self) -> str:
        if self.read_only:
            return f"Volume({self.name!r}).at_version({self._core.pinned_version['id']!r})"
        return f"Volume({self.name!r}, lineage={self.lineage!r})"

    # -- writing ---------------------------------------------------------

    def put_file(self, path: str, data: Data, *, message: Optional[str] = None) -> Version:
        """Write ``data`` as the file at ``path`` and publish it as one version.

        ``data`` is ``bytes``, ``str`` (stored as UTF-8) or a binary file
        object, which is read in chunks of 1 MiB and never whole. Missing
        parent directories are created and an existing file is replaced.
        """
        with self.batch_upload(message=message or f"put {path}") as batch:
            batch.put_file(path, data)
        return self._published(batch)

    def upload_file(self, local_path: Union[str, os.PathLike], path: Optional[str] = None, *, message: Optional[str] = None) -> Version:
        """Copy a local file to ``path`` (default: its file name; a path ending in ``/`` gets it appended) as one version."""
        remote = path if path is not None else os.path.basename(os.fspath(local_path))
        with self.batch_upload(message=message or f"upload {remote}") as batch:
            batch.upload_file(local_path, remote)
        return self._published(batch)

    def upload_directory(self, local_dir: Union[str, os.PathLike], path: str = "", *, message: Optional[str] = None) -> Version:
        """Copy the tree under a local directory to ``path`` as one version."""
        with self.batch_upload(message=message or f"upload {path or '/'}") as batch:
            batch.upload_directory(local_dir, path)
        return self._published(batch)

    def remove(self, path: str, recursive: bool = False, *, message: Optional[str] = None) -> Version:
        """Remove a file or symlink (or, with ``recursive``, a directory tree) as one version."""
        with self.batch_upload(message=message or f"rm {path}") as batch:
            batch.remove(path, recursive=recursive)
        return self._published(batch)

    def batch_upload(self, message: Optional[str] = None) -> "BatchUpload":
        """Group writes into one version: ``with vol.batch_upload() as batch: ...``.

        The version is published when the block exits cleanly; when the block
        raises, nothing is published and the writes are discarded.
        """
        return BatchUpload(self, message)

    def _published(self, batch: "BatchUpload") -> Version:
        if batch.version is None:
            raise ChalkError(f"nothing was published to volume {self.name}")
        return batch.version

    # -- reading ---------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        """Return the whole content of the file at ``path``."""
        return self._core.read_file(path)

    def open(self, path: str, mode: str = "rb", *, buffer_size: int = OPEN_BUFFER_BYTES) -> io.BufferedReader:
        """Open the file at ``path`` as a readable, seekable binary stream.

        The stream reads the version that was current when it was opened,
        in pieces, so files larger than memory can be read. Only ``"rb"`` is
        supported; write with :meth:`put_file`.
        """
        if mode not in ("rb", "br"):
            raise InvalidArgument(f"mode {mode!r} is not supported; volumes open files with 'rb' only, write with put_file")
        raw = VolumeFile(self._core.open_reader(path), name=f"{self.name}/{path.lstrip('/')}")
        return io.BufferedReader(raw, buffer_size=buffer_size)

    def listdir(self, path: str = "", recursive: bool = False) -> list[FileEntry]:
        """List the directory at ``path`` (``""`` or ``"/"`` for the root), sorted by path.

        With ``recursive``, every level below ``path`` is listed.
        """
        return [FileEntry._from_dict(raw) for raw in self._core.listdir(path, recursive)]

    def stat(self, path: str) -> FileEntry:
        """Return the entry of one file, directory or symlink."""
        return FileEntry._from_dict(self._core.stat(path))

    def exists(self, path: str) -> bool:
        try:
            self._core.stat(path)
        except NotFound:
            return False
        return True

    # -- versions --------------------------------------------------------

    def sync(self, on_conflict: str = "error", *, message: Optional[str] = None) -> list[Version]:
        """Publish the writes of every live writable mount of this volume on this host.

        Returns the versions published, one per mount that had changes, and
        an empty list when no mount had any. ``on_conflict`` sets what a mount
        does when its lineage changed the same paths: ``"error"`` raises
        :class:`~chalkcompute.errors.Conflict` and the mount keeps its writes,
        ``"fork"`` publishes into a new lineage, ``"ours"`` overwrites.
        """
        return [Version._from_dict(raw) for raw in self._core.sync_mounts(message, on_conflict)]

    def versions(self, all_lineages: bool = False) -> list[Version]:
        """List the versions of this handle's lineage, oldest first.

        A forked lineage starts with the version it was forked from. With
        ``all_lineages``, every version of the volume is listed once.
        """
        return [Version._from_dict(raw) for raw in self._core.versions(all_lineages)]

    def latest_version(self) -> Version:
        """Return the head of this handle's lineage, or the pinned version."""
        return Version._from_dict(self._core.latest_version())

    def resolve_version(self, version: VersionLike) -> Version:
        """Find a version by id, unique id prefix or tag."""
        return Version._from_dict(self._core.resolve_version(_version_id(version)))

    def at_version(self, version: VersionLike) -> "Volume":
        """Return a read-only handle pinned to ``version`` (id, prefix, tag or Version)."""
        return Volume._wrap(self._core.at_version(_version_id(version)))

    def diff(self, a: VersionLike, b: VersionLike) -> list[Change]:
        """List what changed from version ``a`` to version ``b``, sorted by path."""
        return [Change(**raw) for raw in self._core.diff(_version_id(a), _version_id(b))]

    def fork(self, version: VersionLike, lineage: Optional[str] = None) -> "Volume":
        """Create a lineage whose first version is ``version`` and return a handle on it.

        No data is copied. Without ``lineage`` the name is ``fork-`` plus
        eight random characters.
        """
        return Volume._wrap(self._core.fork(_version_id(version), lineage))


class BatchUpload:
    """Writes grouped into one version; made by :meth:`Volume.batch_upload`.

    Use it as a context manager. After a clean exit, :attr:`version` is the
    version published, or ``None`` when nothing was written.
    """

    def __init__(self, volume: Volume, message: Optional[str] = None) -> None:
        self._volume = volume
        self._message = message
        self._batch: Optional[_native.Batch] = None
        self.version: Optional[Version] = None

    def __enter__(self) -> "BatchUpload":
        if self._batch is not None:
            raise ChalkError("this batch is already open; start another with vol.batch_upload()")
        self._batch = self._volume._core.begin_batch()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if exc_type is not None:
            batch.discard()
            return
        try:
            raw = batch.commit(self._message)
        finally:
            batch.discard()
        self.version = None if raw is None else Version._from_dict(raw)

    def _open_batch(self) -> "_native.Batch":
        if self._batch is None:
            raise ChalkError("the batch is not open; use it as `with vol.batch_upload() as batch:`")
        return self._batch

    def put(self, path: str, data: Data) -> None:
        """Write ``data`` (bytes, str or a binary file object) as the file at ``path``."""
        _write_data(self._open_batch(), path, data)

    def put_file(self, path: str, data: Data) -> None:
        """Same as :meth:`put`."""
        _write_data(self._open_batch(), path, data)

    def upload_file(self, local_path: Union[str, os.PathLike], path: Optional[str] = None) -> None:
        """Copy a local file to ``path`` (default: its file name; a path ending in ``/`` gets it appended)."""
        local = os.fspath(local_path)
        if path is None:
            path = os.path.basename(local)
        elif path.endswith("/"):
            # As for `chalk volume put`: a directory path takes the local file's name.
            path += os.path.basename(local)
        self._open_batch().upload_file(local, path)

    def upload_directory(self, local_dir: Union[str, os.PathLike], path: str = "") -> None:
        """Copy the tree under a local directory to ``path``. Sockets, FIFOs and
        devices are skipped with a warning."""
        _files, _bytes, skipped = self._open_batch().upload_directory(os.fspath(local_dir), path)
        if skipped:
            import warnings

            warnings.warn(f"skipped {len(skipped)} special files (sockets, FIFOs, devices), such as {skipped[0]}", stacklevel=2)

    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file or symlink, or with ``recursive`` a directory tree."""
        self._open_batch().remove(path, recursive)

    def make_dirs(self, path: str) -> None:
        """Create a directory and its missing parents."""
        self._open_batch().make_dirs(path)


class VolumeFile(io.RawIOBase):
    """Unbuffered, seekable reads of one file of one version.

    :meth:`Volume.open` wraps it in an :class:`io.BufferedReader`.
    """

    def __init__(self, reader: "_native.Reader", name: str) -> None:
        super().__init__()
        self._reader = reader
        self._position = 0
        self.name = name

    @property
    def size(self) -> int:
        return self._reader.size

    @property
    def version(self) -> str:
        """Id of the version this file is read from."""
        return self._reader.version

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self._reader.size + offset
        else:
            raise ValueError(f"invalid whence {whence}; use io.SEEK_SET, io.SEEK_CUR or io.SEEK_END")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(buffer).cast("B")
        data = self._reader.read_at(self._position, len(view))
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while True:
            data = self._reader.read_at(self._position, 16 << 20)
            if not data:
                return b"".join(parts)
            parts.append(data)
            self._position += len(data)
