"""Sandboxes: isolated processes on this machine with volumes mounted at
``/volumes/<name>``.

A sandbox is a bubblewrap (``bwrap``) container with new mount, PID, IPC,
UTS and (unless ``network=True``) network namespaces, a tmpfs root with the
image's top-level directories bound read-only, and one FUSE mount per
volume. Each mount is served by a helper process (``chalkcompute._mount``)
with a session of its own, so a sandbox's writes stay private until
:meth:`Sandbox.sync` or :meth:`Volume.sync` publishes them. The helpers
register under ``$CHALK_HOME/run/`` like ``chalk volume mount``, so
``chalk volume sync`` reaches them too.

Lifetime: a sandbox's main process and each helper wait on a pipe whose
other end only the creating process holds, and bwrap runs with
``--die-with-parent`` and each helper requests SIGTERM when its parent ends.
So sandboxes and their mounts end with the process that created them, also
when it is killed, and their unsynced writes are discarded.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence

from . import _native
from .errors import ChalkError, InvalidArgument, StoreUnavailable
from .volume import Version, Volume

DEBIAN_SUITE = "bookworm"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Top-level directories of an image that a sandbox gets fresh instead.
_OWN_DIRECTORIES = {"proc", "dev", "sys", "tmp", "run", "volumes", "lost+found"}
# Seconds a mount helper may take to mount, and to unmount after SIGTERM.
_MOUNT_READY_TIMEOUT_S = 60
_MOUNT_STOP_TIMEOUT_S = 30
# Seconds bwrap may take to build a sandbox's root.
_SANDBOX_READY_TIMEOUT_S = 30


class SandboxError(ChalkError):
    """A sandbox could not be started, or a command in it failed with ``check=True``."""

    def __init__(self, message: str, result: Optional["ExecResult"] = None) -> None:
        super().__init__(message)
        self.result = result


def image_cache_dir() -> Path:
    """Per-machine cache of built images, shared by every CHALK_HOME."""
    configured = os.environ.get("CHALK_IMAGE_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "chalk" / "images"


@dataclass(frozen=True)
class Image:
    """A root file system for sandboxes."""

    name: str
    root: str

    @classmethod
    def host(cls) -> "Image":
        """Return the host's own root file system, bound read-only."""
        return cls("host", "/")

    @classmethod
    def debian_slim(cls) -> "Image":
        """Return a minimal Debian root file system with Python 3 (``python`` and ``python3``).

        Built once with ``debootstrap --variant=minbase`` into the image cache
        (``CHALK_IMAGE_CACHE``, default ``~/.cache/chalk/images``). Where it
        cannot be built, a warning gives the reason and the host root is used instead.
        """
        root = _build_debian_slim()
        if root is None:
            return cls.host()
        return cls("debian-slim", str(root))


def _build_debian_slim() -> Optional[Path]:
    target = image_cache_dir() / f"debian-slim-{DEBIAN_SUITE}"
    if (target / ".complete").exists():
        return target / "root"
    if shutil.which("debootstrap") is None:
        warnings.warn("debootstrap is not installed, so Image.debian_slim() uses the host root read-only; "
                      "install it with `apt-get install debootstrap`", stacklevel=3)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target / "root"
        building = target.parent / f".debian-slim-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        mirror = os.environ.get("CHALK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
        command = ["debootstrap", "--variant=minbase", "--include=python3,python-is-python3",
                   DEBIAN_SUITE, str(building / "root"), mirror]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            detail = "timed out after 30 minutes" if done is None else done.stderr.strip().splitlines()[-1:] or ["no output"]
            shutil.rmtree(building, ignore_errors=True)
            warnings.warn(f"building the debian-slim image with debootstrap failed ({detail}), so "
                          "Image.debian_slim() uses the host root read-only", stacklevel=3)
            return None
        (building / ".complete").write_text(f"debootstrap --variant=minbase {DEBIAN_SUITE} {mirror}\n")
        os.rename(building, target)
    return target / "root"


@dataclass(frozen=True)
class ExecResult:
    """Outcome of :meth:`Sandbox.exec`."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclass
class _Mount:
    volume: str
    directory: Path
    process: subprocess.Popen
    #: Control socket, registered under the store's ``run/`` directory.
    socket: Path


class SandboxClient:
    """Creates sandboxes on this machine."""

    def create(
        self,
        image: Optional[Image] = None,
        volumes: Iterable[Volume] = (),
        workdir: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        timeout: Optional[float] = None,
        network: bool = False,
    ) -> "Sandbox":
        """Start a sandbox.

        Each volume is mounted at ``/volumes/<name>`` through a session of its
        own: on its lineage's latest version, or for a handle from
        :meth:`Volume.at_version` on that version, whose first sync forks a new
        lineage. ``workdir`` (default ``/workspace``, an empty writable
        directory) is where commands start. ``timeout`` (seconds) terminates
        the sandbox when it runs out. Without ``network`` the sandbox has only
        a loopback device.
        """
        return Sandbox(image or Image.debian_slim(), list(volumes), workdir, env or {}, timeout, network)


class Sandbox:
    """A running sandbox; see :class:`SandboxClient`."""

    def __init__(self, image: Image, volumes: list[Volume], workdir: Optional[str],
                 env: dict[str, str], timeout: Optional[float], network: bool) -> None:
        if shutil.which("bwrap") is None:
            raise SandboxError("bwrap (bubblewrap) is not installed; install it with `apt-get install bubblewrap`")
        names = [volume.name for volume in volumes]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"a volume may be mounted once per sandbox, got {names}")
        self.id = uuid.uuid4().hex[:12]
        self.image = image
        self.workdir = workdir or "/workspace"
        self._env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", **env}
        self._store_root = Path(_native.store_location()[0])
        self._directory = self._store_root / "sandboxes" / self.id
        self._mounts: list[_Mount] = []
        self._process: Optional[subprocess.Popen] = None
        self._lifeline: Optional[int] = None
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        try:
            for volume in volumes:
                self._mounts.append(self._start_mount(volume))
            self._child_pid = self._start_bwrap(network)
            self._wait_until_ready()
        except BaseException:
            self.terminate()
            raise
        if timeout is not None:
            self._timer = threading.Timer(timeout, self.terminate)
            self._timer.daemon = True
            self._timer.start()

    # -- start and stop ----------------------------------------------------

    def _start_mount(self, volume: Volume) -> _Mount:
        directory = self._directory / "volumes" / volume.name
        directory.mkdir(parents=True)
        pinned = volume.version
        arguments = {
            "volume": volume.name,
            "dir": str(directory),
            "lineage": volume.lineage,
            "version": pinned.id if pinned is not None else None,
            "writable": True,
            "watch_stdin": True,
        }
        log = open(self._directory / f"mount-{volume.name}.log", "wb")
        with log:
            process = subprocess.Popen(
                [sys.executable, "-m", "chalkcompute._mount", json.dumps(arguments)],
                # The helper stops when this pipe closes, as it does when this process ends.
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            )
        socket = self._store_root / "run" / f"mount-{process.pid}.sock"
        mount = _Mount(volume.name, directory, process, socket)
        ready = _read_line(process.stdout, _MOUNT_READY_TIMEOUT_S)
        if ready != b"ready\n":
            process.kill()
            process.wait()
            detail = (self._directory / f"mount-{volume.name}.log").read_text(errors="replace").strip()
            raise StoreUnavailable(f"mounting volume {volume.name} for sandbox {self.id} failed: {detail or 'no output'}")
        return mount

    def _bwrap_argv(self, network: bool, info_fd: int, lifeline_fd: int) -> list[str]:
        argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--hostname", f"sandbox-{self.id}", "--tmpfs", "/"]
        if not network:
            argv.append("--unshare-net")
        root = Path(self.image.root)
        for entry in sorted(os.listdir(root)):
            if entry in _OWN_DIRECTORIES:
                continue
            path = root / entry
            if path.is_symlink():
                argv += ["--symlink", os.readlink(path), f"/{entry}"]
            elif path.is_dir() or path.is_file():
                argv += ["--ro-bind", str(path), f"/{entry}"]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", "/volumes"]
        for mount in self._mounts:
            argv += ["--bind", str(mount.directory), f"/volumes/{mount.volume}"]
        argv += ["--dir", self.workdir, "--chdir", self.workdir, "--clearenv"]
        for key, value in self._env.items():
            argv += ["--setenv", key, value]
        # The sandbox's main process waits for the end of the lifeline pipe,
        # whose write end only this process holds: when it ends, the pipe
        # closes, the main process exits and bwrap ends the sandbox.
        # cat opens the inherited descriptor through /proc, because dash accepts only descriptors 0 to 9 in redirections.
        argv += ["--info-fd", str(info_fd), "--", "cat", f"/proc/self/fd/{lifeline_fd}"]
        return argv

    def _start_bwrap(self, network: bool) -> int:
        info_read, info_write = os.pipe()
        lifeline_read, self._lifeline = os.pipe()
        log = open(self._directory / "bwrap.log", "wb")
        with log:
            self._process = subprocess.Popen(
                self._bwrap_argv(network, info_write, lifeline_read), pass_fds=(info_write, lifeline_read),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        os.close(info_write)
        os.close(lifeline_read)
        with os.fdopen(info_read, "rb") as info:
            text = b""
            while True:
                chunk = info.read1(4096) if hasattr(info, "read1") else info.read(4096)
                if not chunk:
                    break
                text += chunk
                try:
                    return int(json.loads(text)["child-pid"])
                except ValueError:
                    continue
        self._process.wait()
        detail = (self._directory / "bwrap.log").read_text(errors="replace").strip()
        raise SandboxError(f"starting sandbox {self.id} with bwrap failed: {detail or 'no output'}")

    def _wait_until_ready(self) -> None:
        """Wait until the sandbox's root is in place.

        bwrap reports the child's pid before the child has built its root,
        and a command entering it earlier would see an empty root. The root
        is ready once it is the tmpfs (another device than the host root)
        and contains the binds.
        """
        root = Path(f"/proc/{self._child_pid}/root")
        host_device = os.stat("/").st_dev
        deadline = time.monotonic() + _SANDBOX_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if os.stat(root).st_dev != host_device and (root / "volumes").is_dir():
                    return
            except OSError:
                pass
            if self._process is not None and self._process.poll() is not None:
                break
            time.sleep(0.01)
        detail = (self._directory / "bwrap.log").read_text(errors="replace").strip()
        raise SandboxError(f"sandbox {self.id} did not start within {_SANDBOX_READY_TIMEOUT_S} s: {detail or 'no output from bwrap'}")

    def terminate(self) -> None:
        """End the sandbox and its mounts; writes not synced are discarded."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._process is not None and self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None
            for mount in self._mounts:
                if mount.process.poll() is None:
                    mount.process.send_signal(signal.SIGTERM)
            for mount in self._mounts:
                try:
                    mount.process.wait(timeout=_MOUNT_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    mount.process.kill()
                    mount.process.wait()
                for stream in (mount.process.stdin, mount.process.stdout):
                    if stream is not None:
                        stream.close()
            self._mounts = []
            shutil.rmtree(self._directory, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    # -- commands ----------------------------------------------------------

    def _command(self, argv: Sequence[str], workdir: Optional[str], env: Optional[dict[str, str]]) -> list[str]:
        if not argv:
            raise InvalidArgument("exec needs a command, such as sandbox.exec('ls', '/volumes')")
        if not self.running:
            raise SandboxError(f"sandbox {self.id} is not running")
        variables = {**self._env, **(env or {})}
        # nsenter resolves --wd=DIR outside the sandbox, so env changes directory inside it.
        return ["nsenter", f"--target={self._child_pid}", "--mount", "--uts", "--ipc", "--net", "--pid",
                "--root", "--", "/usr/bin/env", "-i", f"--chdir={workdir or self.workdir}",
                *[f"{key}={value}" for key, value in variables.items()], *argv]

    def exec(self, *argv: str, check: bool = False, timeout: Optional[float] = None,
             workdir: Optional[str] = None, env: Optional[dict[str, str]] = None,
             input: Optional[bytes] = None) -> ExecResult:
        """Run a command inside the sandbox and wait for it.

        With ``check=True`` a non-zero exit raises :class:`SandboxError`
        carrying the result. ``timeout`` is in seconds.
        """
        done = subprocess.run(self._command(argv, workdir, env), input=input, capture_output=True, timeout=timeout)
        result = ExecResult(tuple(argv), done.returncode, done.stdout.decode(errors="replace"),
                            done.stderr.decode(errors="replace"))
        if check and result.returncode != 0:
            raise SandboxError(f"{' '.join(argv)!r} exited with {result.returncode} in sandbox {self.id}: "
                               f"{result.stderr.strip()[-500:]}", result)
        return result

    def exec_stream(self, *argv: str, workdir: Optional[str] = None,
                    env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        """Start a command inside the sandbox and return it running, with
        ``stdout`` and ``stderr`` as pipes to read while it runs."""
        return subprocess.Popen(self._command(argv, workdir, env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # -- versions ----------------------------------------------------------

    def sync(self, on_conflict: str = "error", *, message: Optional[str] = None) -> list[Version]:
        """Publish the writes of this sandbox's mounts; return the new versions."""
        published = []
        for mount in self._mounts:
            raw = _native.sync_mount_socket(str(mount.socket), message, on_conflict)
            if raw is not None:
                published.append(Version._from_dict(raw))
        return published


def _read_line(stream: Optional[IO[bytes]], timeout_s: float) -> bytes:
    """Read one line from a child's pipe, or return ``b""`` after ``timeout_s``."""
    if stream is None:
        return b""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result else b""
