"""vol.sync() publishes the writes of live `chalk volume mount` mounts: they
are invisible to the SDK before the sync and visible after it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from chalkcompute import Conflict, NotFound, Volume


def chalk(chalk_bin: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(chalk_bin), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chalk {' '.join(args)} failed: {result.stderr}"
    return result


@pytest.fixture
def mount(chalk_bin: Path, chalk_home: Path):
    """Mount volumes under CHALK_HOME in the background; unmount them all at the end."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing; these tests need FUSE (modprobe fuse)")
    mounted: list[Path] = []

    def mount_volume(name: str, *options: str) -> Path:
        directory = chalk_home / f"mnt-{len(mounted)}"
        directory.mkdir()
        chalk(chalk_bin, "volume", "mount", name, str(directory), "--daemon", *options)
        mounted.append(directory)
        return directory

    try:
        yield mount_volume
    finally:
        for directory in mounted:
            subprocess.run([str(chalk_bin), "volume", "unmount", str(directory)], capture_output=True, timeout=60)


def test_sync_publishes_mount_writes(mount) -> None:
    vol = Volume.create("my-data")
    writable = mount("my-data")
    mount("my-data", "--read-only")
    (writable / "output.parquet").write_bytes(b"parquet bytes")

    with pytest.raises(NotFound):
        vol.read_file("output.parquet")
    versions = vol.versions()

    published = vol.sync()

    assert len(published) == 1
    assert vol.versions() == versions + published
    assert vol.read_file("output.parquet") == b"parquet bytes"
    assert vol.sync() == []


def test_sync_conflict_names_paths(mount) -> None:
    vol = Volume.create("my-data")
    vol.put_file("same.txt", b"base")
    writable = mount("my-data")
    (writable / "same.txt").write_bytes(b"from the mount")
    vol.put_file("same.txt", b"from the SDK")

    with pytest.raises(Conflict) as raised:
        vol.sync()
    assert raised.value.paths == ["same.txt"]
    assert vol.read_file("same.txt") == b"from the SDK"

    [forked] = vol.sync(on_conflict="fork")
    assert forked.lineage != "main"
    assert Volume("my-data", lineage=forked.lineage).read_file("same.txt") == b"from the mount"
    assert vol.read_file("same.txt") == b"from the SDK"
