"""Files larger than the process may hold in memory: put_file streams from
a file object, and open() reads back in pieces, with the process's
anonymous memory staying bounded.

The bound is on RssAnon, not VmRSS: the engine maps sealed segment files
with mmap, so pages of the file being read count in RssFile while they are
mapped. Those are page-cache pages, which the kernel reclaims under memory
pressure; anonymous pages are what the process itself holds."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time

import pytest

from chalkcompute import Volume

FILE_BYTES = 384 << 20
# The file is 384 MiB; the process may grow by at most this much while it
# writes or reads it. The caches below are set to 32 MiB and 8 MiB.
RSS_GROWTH_MAX_BYTES = 128 << 20


class GeneratedFile(io.RawIOBase):
    """A read-only file of pseudo-random bytes made as they are read."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self._remaining = size
        self._random = random.Random(seed)
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._remaining)
        data = self._random.randbytes(count)
        self.sha256.update(data)
        buffer[:count] = data
        self._remaining -= count
        return count


def rss_bytes() -> int:
    """Return the anonymous resident memory of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon missing from /proc/self/status")


class PeakRss:
    """Samples the anonymous resident memory every 5 ms while the block runs."""

    def __enter__(self) -> "PeakRss":
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


@pytest.fixture
def small_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHALK_CACHE_MEMORY", "32M")
    monkeypatch.setenv("CHALK_CACHE_READAHEAD", "8M")


def test_large_file_streams_with_bounded_memory(small_caches: None) -> None:
    vol = Volume.create("large")
    source = GeneratedFile(FILE_BYTES, seed=7)
    with PeakRss() as writing:
        version = vol.put_file("big.bin", source)
    assert version.bytes == FILE_BYTES
    assert vol.stat("big.bin").size == FILE_BYTES
    assert writing.growth < RSS_GROWTH_MAX_BYTES, f"anonymous memory grew by {writing.growth >> 20} MiB while writing"

    readback = hashlib.sha256()
    total = 0
    with PeakRss() as reading:
        with vol.open("big.bin") as stream:
            while chunk := stream.read(4 << 20):
                readback.update(chunk)
                total += len(chunk)
    assert total == FILE_BYTES
    assert readback.hexdigest() == source.sha256.hexdigest()
    assert reading.growth < RSS_GROWTH_MAX_BYTES, f"anonymous memory grew by {reading.growth >> 20} MiB while reading"
