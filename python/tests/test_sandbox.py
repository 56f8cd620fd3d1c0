"""Sandboxes: bubblewrap containers with volumes mounted at /volumes/NAME,
running the product page's sandbox, sync and fork examples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chalkcompute import Image, SandboxClient, SandboxError, Volume
from conftest import fixture_text
from test_volume import run_block

APPROACH_A = """\
with open("/volumes/my-data/result.txt", "w") as f:
    f.write("approach a\\n")
with open("/volumes/my-data/only_a.txt", "w") as f:
    f.write("a")
"""
APPROACH_B = """\
with open("/volumes/my-data/result.txt", "w") as f:
    f.write("approach b\\n")
"""


@pytest.fixture
def client():
    """A client whose sandboxes are all terminated at the end of the test."""
    created = []

    class TrackingClient(SandboxClient):
        def create(self, *args, **kwargs):
            sandbox = super().create(*args, **kwargs)
            created.append(sandbox)
            return sandbox

    try:
        yield TrackingClient()
    finally:
        for sandbox in created:
            sandbox.terminate()


def chalk_mounts() -> list[str]:
    """Chalk mounts below this test's CHALK_HOME, where its sandboxes mount;
    other tests and developers on the host may have chalk mounts elsewhere."""
    home = os.environ["CHALK_HOME"].rstrip("/") + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo if " chalk:" in line]
    return [point for point in points if point.startswith(home)]


def test_seed_sandbox_block(client) -> None:
    vol = Volume.create("my-data")
    vol.put_file("models/latest.bin", b"weights")
    namespace = {"SandboxClient": lambda: client}
    source = fixture_text("seed_sandbox_block.py").replace(
        "from chalkcompute import SandboxClient, Image, Volume", "from chalkcompute import Image, Volume")
    run_block(source, namespace)

    sandbox = namespace["sandbox"]
    listing = sandbox.exec("ls", "/volumes/my-data")
    assert listing.returncode == 0
    assert listing.stdout.split() == ["models"]
    assert sandbox.exec("cat", "/volumes/my-data/models/latest.bin").stdout == "weights"
    for python in ["python", "python3"]:
        result = sandbox.exec(python, "-c", "import sys; print(sys.version_info[0])")
        assert result.stdout.strip() == "3", result.stderr


def test_sandbox_namespaces(client) -> None:
    vol = Volume.create("my-data")
    sandbox = client.create(image=Image.debian_slim(), volumes=[vol], env={"GREETING": "hi"})
    assert sandbox.exec("sh", "-c", "echo $$").stdout.strip() != str(os.getpid())
    # Processes of the host are invisible: the sandbox has its own PID namespace.
    assert int(sandbox.exec("sh", "-c", "ls /proc | grep -c '^[0-9]'").stdout) < 10
    # Without network, only the loopback device exists.
    devices = sandbox.exec("cat", "/proc/net/dev").stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]
    assert sandbox.exec("sh", "-c", "echo $GREETING").stdout == "hi\n"
    assert sandbox.exec("pwd").stdout == "/workspace\n"
    assert sandbox.exec("touch", "/etc/not-writable").returncode != 0
    with pytest.raises(SandboxError) as raised:
        sandbox.exec("sh", "-c", "echo failing >&2; exit 3", check=True)
    assert raised.value.result.returncode == 3
    assert "failing" in str(raised.value)
    streamed = sandbox.exec_stream("sh", "-c", "echo one; echo two")
    assert streamed.stdout.read().splitlines() == [b"one", b"two"]
    assert streamed.wait() == 0


def test_seed_sync_block(client) -> None:
    vol = Volume.create("my-data")
    sandbox = client.create(image=Image.debian_slim(), volumes=[vol])
    sandbox.exec("sh", "-c", "echo parquet bytes > output.parquet", check=True)
    namespace = {"sandbox": sandbox, "vol": vol}
    versions = vol.versions()

    source = fixture_text("seed_sync_block.py")
    copy, flush = source.split("# Flush writes to the backing store")
    run_block(copy, namespace)
    assert not vol.exists("output.parquet")
    assert vol.versions() == versions
    assert sandbox.exec("cat", "/volumes/my-data/output.parquet").stdout == "parquet bytes\n"

    run_block(flush, namespace)
    assert vol.read_file("output.parquet") == b"parquet bytes\n"
    assert len(vol.versions()) == len(versions) + 1


def test_terminated_sandbox_leaves_nothing(client) -> None:
    vol = Volume.create("my-data")
    sandbox = client.create(image=Image.debian_slim(), volumes=[vol])
    sandbox.exec("sh", "-c", "echo lost > /volumes/my-data/unsynced.txt", check=True)
    sandbox.terminate()
    assert vol.sync() == []
    assert not vol.exists("unsynced.txt")
    assert len(vol.versions()) == 1
    assert chalk_mounts() == []


def test_seed_fork_block(client) -> None:
    vol = Volume.create("my-data")
    with vol.batch_upload() as batch:
        batch.put("approach_a.py", APPROACH_A)
        batch.put("approach_b.py", APPROACH_B)
        batch.put("result.txt", "base\n")
    namespace = {"vol": vol, "client": client, "Image": Image}
    run_block(fixture_text("seed_fork_block.py"), namespace)
    base = namespace["base_version"]
    sandbox_a, sandbox_b = namespace["sandbox_a"], namespace["sandbox_b"]

    # Each sandbox reads only its own writes.
    assert sandbox_a.exec("cat", "/volumes/my-data/result.txt").stdout == "approach a\n"
    assert sandbox_b.exec("cat", "/volumes/my-data/result.txt").stdout == "approach b\n"
    assert sandbox_b.exec("test", "-e", "/volumes/my-data/only_a.txt").returncode == 1

    [version_a] = sandbox_a.sync()
    [version_b] = sandbox_b.sync()
    assert version_a.lineage != version_b.lineage
    assert "main" not in (version_a.lineage, version_b.lineage)
    assert version_a.parent == base.id
    assert version_b.parent == base.id
    assert vol.at_version(version_a).read_file("result.txt") == b"approach a\n"
    assert vol.at_version(version_b).read_file("result.txt") == b"approach b\n"
    assert not vol.at_version(version_b).exists("only_a.txt")
    # The base version and main stay as they were.
    assert vol.latest_version() == base
    assert vol.at_version(base).read_file("result.txt") == b"base\n"
    assert [(c.path, c.kind) for c in vol.diff(version_a, version_b)] == [("only_a.txt", "removed"), ("result.txt", "modified")]


def test_sandbox_ends_with_killed_process(chalk_home: Path) -> None:
    Volume.create("my-data")
    script = (
        "import sys, time\n"
        "from chalkcompute import Image, SandboxClient, Volume\n"
        "sandbox = SandboxClient().create(image=Image.debian_slim(), volumes=[Volume('my-data')])\n"
        "print(sandbox._process.pid, *[m.process.pid for m in sandbox._mounts], flush=True)\n"
        "time.sleep(600)\n"
    )
    creator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in creator.stdout.readline().split()]
        assert len(pids) == 2
        assert len(chalk_mounts()) == 1
        creator.send_signal(signal.SIGKILL)
        creator.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (chalk_mounts() or any(Path(f"/proc/{pid}").exists() for pid in pids)):
            time.sleep(0.1)
        assert chalk_mounts() == []
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the process that created it"
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()


def test_sandbox_rejects_duplicate_volumes(client) -> None:
    vol = Volume.create("my-data")
    with pytest.raises(ValueError, match="my-data"):
        client.create(image=Image.host(), volumes=[vol, vol])


def sandbox_run(chalk_bin: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(chalk_bin), "sandbox", "run", *args], capture_output=True, text=True, timeout=300)


def test_chalk_sandbox_run(chalk_bin: Path) -> None:
    vol = Volume.create("my-data")
    base = vol.put_file("data.txt", b"base")

    listing = sandbox_run(chalk_bin, "--volume", "my-data", "--", "ls", "/volumes/my-data")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["data.txt"]

    discarded = sandbox_run(chalk_bin, "--volume", "my-data", "--", "sh", "-c", "echo gone > /volumes/my-data/new.txt")
    assert discarded.returncode == 0, discarded.stderr
    assert not vol.exists("new.txt")

    synced = sandbox_run(chalk_bin, "--volume", "my-data", "--sync", "--", "sh", "-c", "echo kept > /volumes/my-data/new.txt")
    assert synced.returncode == 0, synced.stderr
    assert vol.read_file("new.txt") == b"kept\n"

    forked = sandbox_run(chalk_bin, "--volume", f"my-data@{base.id}", "--sync", "--", "python", "-c",
                         "open('/volumes/my-data/data.txt', 'w').write('forked')")
    assert forked.returncode == 0, forked.stderr
    assert vol.read_file("data.txt") == b"base"
    [fork_lineage] = {v.lineage for v in vol.versions(all_lineages=True)} - {"main"}
    assert Volume("my-data", lineage=fork_lineage).read_file("data.txt") == b"forked"

    failing = sandbox_run(chalk_bin, "--image", "host", "--", "sh", "-c", "exit 7")
    assert failing.returncode == 7

    versions = len(vol.versions())
    failed_sync = sandbox_run(chalk_bin, "--volume", "my-data", "--sync", "--", "sh", "-c",
                              "echo lost > /volumes/my-data/lost.txt; exit 3")
    assert failed_sync.returncode == 3
    assert "--sync published nothing" in failed_sync.stderr
    assert "my-data" in failed_sync.stderr
    assert not vol.exists("lost.txt")
    assert len(vol.versions()) == versions
    assert chalk_mounts() == []


def test_chalk_volume_sync_reaches_sandboxes(client, chalk_bin: Path) -> None:
    vol = Volume.create("my-data")
    sandbox = client.create(image=Image.debian_slim(), volumes=[vol])
    sandbox.exec("sh", "-c", "echo from the sandbox > /volumes/my-data/cli.txt", check=True)
    synced = subprocess.run([str(chalk_bin), "volume", "sync", "my-data"], capture_output=True, text=True, timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert vol.read_file("cli.txt") == b"from the sandbox\n"
    assert synced.stdout.strip() == vol.latest_version().id


def test_sandbox_timeout_terminates(client) -> None:
    vol = Volume.create("my-data")
    sandbox = client.create(image=Image.debian_slim(), volumes=[vol], timeout=1)
    assert sandbox.running
    # terminate() kills bwrap first, then waits for the mounts to end.
    deadline = time.monotonic() + 30
    while (sandbox.running or chalk_mounts()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sandbox.running
    assert chalk_mounts() == []
    with pytest.raises(SandboxError, match="not running"):
        sandbox.exec("true")
