"""Fixtures of the SDK tests.

Every test runs against its own store: a fresh CHALK_HOME under /var/tmp
(not tmpfs, because the engine opens segment files with O_DIRECT), removed
afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def chalk_home(monkeypatch: pytest.MonkeyPatch) -> Path:
    # scripts/test.sh points TMPDIR into its run directory under /var/tmp and
    # unmounts whatever is left there; any other TMPDIR may be a tmpfs.
    tmpdir = os.environ.get("TMPDIR", "")
    parent = tmpdir if tmpdir.startswith("/var/tmp/") else "/var/tmp"
    home = Path(tempfile.mkdtemp(prefix="chalk-sdk-test.", dir=parent))
    monkeypatch.setenv("CHALK_HOME", str(home))
    monkeypatch.delenv("CHALK_STORE", raising=False)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def find_chalk_binary() -> Path:
    """The `chalk` binary of this checkout: $CHALK_BIN, else the release build."""
    if os.environ.get("CHALK_BIN"):
        return Path(os.environ["CHALK_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    binary = target / "release" / "chalk"
    if not binary.is_file():
        pytest.fail(f"chalk binary not found at {binary}; build it with `cargo build --release -p chalk-tools` or set CHALK_BIN")
    return binary


@pytest.fixture
def chalk_bin() -> Path:
    return find_chalk_binary()


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()
