"""fsspec filesystem for ``chalk://`` URLs.

``chalk://VOLUME/PATH`` names a path in the head of a volume's ``main``
lineage and ``chalk://VOLUME@VERSION/PATH`` a path in one version (an id,
unique id prefix or tag), which is read-only. ``chalk://`` alone lists the
volumes. The store is the one ``CHALK_HOME`` and ``CHALK_STORE`` select.

Writes publish one version per closed file, or one version per volume for
all files written inside ``with fs.transaction:``. A file being written
streams its bytes into the volume's session as they come, so its size is
not limited by memory.
"""

from __future__ import annotations

import io
from typing import Any, Optional

from fsspec.spec import AbstractFileSystem
from fsspec.transaction import Transaction

from . import _native
from .errors import AlreadyExists, InvalidArgument, NotFound, ReadOnly
from .volume import OPEN_BUFFER_BYTES, STREAM_CHUNK_BYTES, Volume, VolumeFile, _write_stream

_TYPES = {"dir": "directory", "file": "file", "symlink": "link"}


def _split(path: str) -> tuple[str, Optional[str], str]:
    """Split a stripped path into ``(volume, version or None, path in volume)``."""
    head, _, inner = path.partition("/")
    volume, at, version = head.partition("@")
    if at and not version:
        raise InvalidArgument(f"empty version after '@' in {path!r}; write chalk://VOLUME@VERSION/PATH")
    return volume, (version or None), inner.strip("/")


class ChalkTransaction(Transaction):
    """A transaction that publishes one version per volume when it ends."""

    def complete(self, commit: bool = True) -> None:
        # fsspec's complete() detaches the filesystem from the transaction.
        fs = self.fs
        try:
            super().complete(commit)
        finally:
            fs._end_transaction(commit)


class ChalkFileSystem(AbstractFileSystem):
    """fsspec filesystem over the volumes of the current store."""

    protocol = "chalk"
    root_marker = ""
    transaction_type = ChalkTransaction
    # Handles depend on CHALK_HOME, which tests and jobs may change; fsspec's
    # instance cache would keep a handle on an earlier store.
    cachable = False

    def __init__(self, **storage_options: Any) -> None:
        super().__init__(**storage_options)
        # Open batches of the current transaction, by volume name.
        self._transaction_batches: dict[str, Any] = {}

    # -- paths -------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("chalk://"):
            path = path[len("chalk://") :]
        elif path.startswith("chalk::"):
            path = path[len("chalk::") :]
        return path.strip("/")

    def _volume(self, path: str) -> tuple[Volume, str, str]:
        """Return ``(handle, path in volume, volume prefix of fsspec names)``."""
        name, version, inner = _split(self._strip_protocol(path))
        if not name:
            raise InvalidArgument(f"{path!r} names no volume; write chalk://VOLUME/PATH")
        volume = Volume(name)
        prefix = name
        if version is not None:
            volume = volume.at_version(version)
            prefix = f"{name}@{version}"
        return volume, inner, prefix

    @staticmethod
    def _info_dict(prefix: str, raw: dict[str, Any]) -> dict[str, Any]:
        name = f"{prefix}/{raw['path']}" if raw["path"] else prefix
        return {
            "name": name,
            "size": raw["size"] if raw["type"] == "file" else 0,
            "type": _TYPES.get(raw["type"], "other"),
            "mtime": raw["mtime"],
            "mode": raw["mode"],
            "islink": raw["type"] == "symlink",
            "destination": raw["target"],
        }

    # -- reading -----------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        stripped = self._strip_protocol(path)
        if not stripped:
            entries = [
                {"name": name, "size": 0, "type": "directory", "mtime": latest["created_at"]}
                for name, latest in _native.list_volumes()
            ]
        else:
            volume, inner, prefix = self._volume(stripped)
            raw = volume._core.stat(inner)
            if raw["type"] == "dir":
                entries = [self._info_dict(prefix, child) for child in volume._core.listdir(inner, False)]
            else:
                entries = [self._info_dict(prefix, raw)]
        return entries if detail else [entry["name"] for entry in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        stripped = self._strip_protocol(path)
        if not stripped:
            return {"name": "", "size": 0, "type": "directory"}
        volume, inner, prefix = self._volume(stripped)
        return self._info_dict(prefix, volume._core.stat(inner))

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
        except NotFound:
            return False
        return True

    def modified(self, path: str) -> Any:
        from datetime import datetime, timezone

        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    def cat_file(self, path: str, start: Optional[int] = None, end: Optional[int] = None, **kwargs: Any) -> bytes:
        volume, inner, _prefix = self._volume(path)
        if start is None and end is None:
            return volume.read_file(inner)
        reader = volume._core.open_reader(inner)
        size = reader.size
        start = self._absolute_offset(start, size, default=0)
        end = self._absolute_offset(end, size, default=size)
        parts = []
        while start < end:
            data = reader.read_at(start, end - start)
            if not data:
                break
            parts.append(data)
            start += len(data)
        return b"".join(parts)

    @staticmethod
    def _absolute_offset(offset: Optional[int], size: int, default: int) -> int:
        """Resolve an fsspec range bound: ``None`` is ``default``, a negative one counts from the end."""
        if offset is None:
            return default
        if offset < 0:
            return max(size + offset, 0)
        return min(offset, size)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True, **kwargs: Any) -> Any:
        volume, inner, prefix = self._volume(path)
        if "r" in mode:
            raw = VolumeFile(volume._core.open_reader(inner), name=f"{prefix}/{inner}")
            return io.BufferedReader(raw, buffer_size=block_size or OPEN_BUFFER_BYTES)
        if mode not in ("wb", "xb"):
            raise InvalidArgument(f"mode {mode!r} is not supported for {path!r}; use 'rb', 'wb' or 'xb'")
        if volume.read_only:
            raise ReadOnly(f"{path!r} names a pinned version, which is read-only; write to chalk://{volume.name}/{inner}")
        if mode == "xb" and volume.exists(inner):
            raise AlreadyExists(f"{path!r} already exists")
        if not autocommit and self._intrans:
            batch = self._transaction_batch(volume)
            return ChalkWriteFile(self, batch, inner, f"{prefix}/{inner}", owns_batch=False)
        return ChalkWriteFile(self, volume._core.begin_batch(), inner, f"{prefix}/{inner}", owns_batch=True)

    # -- writing -----------------------------------------------------------

    def _transaction_batch(self, volume: Volume) -> Any:
        batch = self._transaction_batches.get(volume.name)
        if batch is None:
            batch = volume._core.begin_batch()
            self._transaction_batches[volume.name] = batch
        return batch

    def _end_transaction(self, commit: bool) -> None:
        batches, self._transaction_batches = self._transaction_batches, {}
        errors = []
        for name, batch in batches.items():
            try:
                if commit:
                    batch.commit(f"fsspec transaction on {name}")
            except Exception as error:  # noqa: BLE001 - every batch is ended, then the first error raised
                errors.append(error)
            finally:
                batch.discard()
        if errors:
            raise errors[0]

    def _write_batch(self, path: str, action: Any, message: str) -> None:
        volume, inner, _prefix = self._volume(path)
        if volume.read_only:
            raise ReadOnly(f"{path!r} names a pinned version, which is read-only")
        if self._intrans:
            action(self._transaction_batch(volume), inner)
            return
        batch = volume._core.begin_batch()
        try:
            action(batch, inner)
            batch.commit(message.format(path=inner))
        finally:
            batch.discard()

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy one file, streamed, as one version of the destination's volume.

        The source may be in another volume or a pinned version. fsspec's
        ``copy`` calls this for each file, and ``mv`` copies, then removes
        the source, which publishes a second version.
        """
        source, source_inner, _prefix = self._volume(path1)
        if source.stat(source_inner).type == "dir":
            self.mkdir(path2)
            return

        def copy(batch: Any, inner: str) -> None:
            with source.open(source_inner) as reader:
                _write_stream(batch, inner, reader)

        self._write_batch(path2, copy, "cp {path}")

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self._write_batch(path, lambda batch, inner: batch.put_bytes(inner, bytes(value)), "put {path}")

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._write_batch(path, lambda batch, inner: batch.make_dirs(inner), "mkdir {path}")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if not exist_ok and self.exists(path):
            raise AlreadyExists(f"{path!r} already exists")
        self.mkdir(path)

    def rm_file(self, path: str) -> None:
        self._write_batch(path, lambda batch, inner: batch.remove(inner, False), "rm {path}")

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: Optional[int] = None) -> None:
        paths = path if isinstance(path, list) else [path]
        for target in paths:
            self._write_batch(target, lambda batch, inner: batch.remove(inner, recursive), "rm {path}")

    def rmdir(self, path: str) -> None:
        self._write_batch(path, lambda batch, inner: batch.remove(inner, False), "rmdir {path}")


class ChalkWriteFile(io.RawIOBase):
    """A file being written to a volume.

    Bytes go into the batch's session as they arrive. Closing the file
    publishes one version, unless the file belongs to a transaction, which
    publishes when it ends.
    """

    def __init__(self, fs: ChalkFileSystem, batch: Any, inner: str, name: str, owns_batch: bool) -> None:
        super().__init__()
        self.fs = fs
        self.name = name
        self.path = name
        self._batch = batch
        self._inner = inner
        self._owns_batch = owns_batch
        self._ino = batch.begin_file(inner)
        self._offset = 0
        self._pending = bytearray()
        self.version: Optional[dict[str, Any]] = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset + len(self._pending)

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(data).cast("B")
        self._pending += view
        if len(self._pending) >= STREAM_CHUNK_BYTES:
            self._flush_pending()
        return len(view)

    def _flush_pending(self) -> None:
        if self._pending:
            self._batch.write_at(self._ino, self._offset, bytes(self._pending))
            self._offset += len(self._pending)
            self._pending.clear()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._flush_pending()
            if self._owns_batch:
                self.version = self._batch.commit(f"put {self._inner}")
        finally:
            if self._owns_batch:
                self._batch.discard()
            super().close()

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        # A block that raised leaves a partial file: publish nothing.
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def discard(self) -> None:
        """Abandon the file; its transaction, if any, decides what is published."""
        if self._owns_batch:
            self._batch.discard()
        super().close()

    def commit(self) -> None:
        """Part of fsspec's transaction protocol: the transaction publishes."""
