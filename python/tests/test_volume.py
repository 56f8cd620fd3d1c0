"""Volumes through the SDK: the product page's examples, batches, versions,
forks and the exceptions each misuse raises."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
from pathlib import Path

import pytest

import chalkcompute
from chalkcompute import (
    AlreadyExists,
    ChalkError,
    Conflict,
    InvalidArgument,
    InvalidPath,
    NotFound,
    ReadOnly,
    StoreUnavailable,
    Volume,
)
from conftest import fixture_text


def run_block(source: str, namespace: dict) -> str:
    """Run a restored code block of the product page and return what it printed."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(source, "<seed block>", "exec"), namespace)
    return output.getvalue()


def test_seed_cli_and_sdk_blocks(chalk_bin: Path, tmp_path: Path) -> None:
    cli_model = b"model from the CLI\n" * 1000
    (tmp_path / "local-model.bin").write_bytes(cli_model)
    env = {**os.environ, "PATH": f"{chalk_bin.parent}:{os.environ['PATH']}"}
    cli = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", fixture_text("seed_cli_block.sh")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "downloaded-model.bin").read_bytes() == cli_model
    assert "models" in cli.stdout

    namespace = {
        "model_bytes": b"\x00model weights\xff" * 4096,
        "train_csv": "x,y\n1,2\n3,4\n",
        "eval_csv": b"x,y\n5,6\n",
    }
    printed = run_block(fixture_text("seed_sdk_block.py"), namespace)

    assert namespace["data"] == namespace["model_bytes"]
    assert printed.splitlines() == ["data/eval.csv 8 bytes", "data/train.csv 12 bytes"]
    vol = namespace["vol"]
    # create, CLI put, put_file, batch: four versions on main.
    assert [v.seq for v in vol.versions()] == [1, 2, 3, 4]
    assert vol.read_file("data/train.csv") == b"x,y\n1,2\n3,4\n"


def test_seed_versions_block() -> None:
    vol = Volume.create("my-data")
    vol.put_file("models/latest.bin", b"first model")
    vol.put_file("models/latest.bin", b"second model")
    namespace = {"vol": vol}
    run_block(fixture_text("seed_versions_block.py"), namespace)
    assert namespace["data"] == b"first model"
    assert vol.read_file("models/latest.bin") == b"second model"
    assert namespace["old"].read_only


def test_put_file_publishes_one_version_per_call() -> None:
    vol = Volume("my-data", create_if_missing=True)
    before = len(vol.versions())
    version = vol.put_file("a/b/c.txt", "héllo")
    assert len(vol.versions()) == before + 1
    assert vol.latest_version() == version
    assert version.message == "put a/b/c.txt"
    assert version.parent == vol.versions()[-2].id
    assert vol.read_file("a/b/c.txt") == "héllo".encode("utf-8")


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"raw bytes", b"raw bytes"),
        ("text ü", "text ü".encode()),
        (bytearray(b"array"), b"array"),
        (memoryview(b"view"), b"view"),
        (io.BytesIO(b"file object" * 100_000), b"file object" * 100_000),
        (b"", b""),
    ],
    ids=["bytes", "str", "bytearray", "memoryview", "file-object", "empty"],
)
def test_put_file_accepts_data_types(data, expected) -> None:
    vol = Volume.create("types")
    vol.put_file("f", data)
    assert vol.read_file("f") == expected
    assert vol.stat("f").size == len(expected)


def test_put_file_rejects_other_data() -> None:
    vol = Volume.create("types")
    versions = len(vol.versions())
    with pytest.raises(TypeError, match="int"):
        vol.put_file("f", 42)
    with pytest.raises(TypeError, match="binary mode"):
        vol.put_file("f", io.StringIO("text stream"))
    assert len(vol.versions()) == versions


def test_trailing_slash_names_a_directory(tmp_path: Path) -> None:
    vol = Volume.create("slash")
    versions = len(vol.versions())
    with pytest.raises(InvalidPath, match="ends in '/'"):
        vol.put_file("models/", b"weights")
    with pytest.raises(InvalidPath, match="ends in '/'"):
        vol.put_file("models/", io.BytesIO(b"weights"))
    assert len(vol.versions()) == versions
    assert not vol.exists("models")

    # As with `chalk volume put`, a directory path takes the local file's name.
    local = tmp_path / "weights.bin"
    local.write_bytes(b"weights")
    vol.upload_file(local, "models/")
    assert vol.read_file("models/weights.bin") == b"weights"
    assert vol.stat("models").type == "dir"


def test_remove_directory_needs_recursive() -> None:
    vol = Volume.create("tree")
    vol.put_file("data/a.txt", b"a")
    with pytest.raises(InvalidPath, match=re.escape("recursive=True")):
        vol.remove("data")
    assert vol.exists("data/a.txt")
    vol.remove("data", recursive=True)
    assert not vol.exists("data")


def test_batch_upload_publishes_one_version(tmp_path: Path) -> None:
    vol = Volume.create("batch")
    local_file = tmp_path / "weights.bin"
    local_file.write_bytes(b"w" * 5000)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "sub" / "deep.txt").write_text("deep")
    os.symlink("top.txt", tree / "link")

    with vol.batch_upload(message="several files") as batch:
        batch.put("data/train.csv", "a\n1\n")
        batch.put_file("data/stream.bin", io.BytesIO(b"s" * 3_000_000))
        batch.upload_file(local_file, "models/weights.bin")
        batch.upload_directory(tree, "tree")

    versions = vol.versions()
    assert len(versions) == 2
    assert batch.version == versions[-1]
    assert batch.version.message == "several files"
    assert vol.read_file("data/stream.bin") == b"s" * 3_000_000
    assert vol.read_file("models/weights.bin") == b"w" * 5000
    assert vol.read_file("tree/sub/deep.txt") == b"deep"
    link = vol.stat("tree/link")
    assert (link.type, link.target) == ("symlink", "top.txt")
    assert [e.path for e in vol.listdir("tree", recursive=True)] == [
        "tree/link", "tree/sub", "tree/sub/deep.txt", "tree/top.txt",
    ]


def test_batch_upload_that_raises_creates_no_version() -> None:
    vol = Volume.create("batch")
    vol.put_file("kept.txt", b"kept")
    versions = vol.versions()

    with pytest.raises(RuntimeError, match="job failed"):
        with vol.batch_upload() as batch:
            batch.put("data/partial.csv", b"half of it")
            batch.put("kept.txt", b"overwritten")
            raise RuntimeError("job failed")

    assert vol.versions() == versions
    assert batch.version is None
    assert not vol.exists("data/partial.csv")
    assert vol.read_file("kept.txt") == b"kept"


def test_batch_upload_used_outside_with_raises() -> None:
    vol = Volume.create("batch")
    batch = vol.batch_upload()
    with pytest.raises(ChalkError, match="with vol.batch_upload"):
        batch.put("x", b"1")


def test_upload_file_and_directory_from_volume(tmp_path: Path) -> None:
    vol = Volume.create("uploads")
    (tmp_path / "model.bin").write_bytes(b"m" * 10)
    os.chmod(tmp_path / "model.bin", 0o600)
    vol.upload_file(tmp_path / "model.bin")
    assert vol.read_file("model.bin") == b"m" * 10
    assert vol.stat("model.bin").mode == 0o600
    (tmp_path / "dir" / "a").mkdir(parents=True)
    (tmp_path / "dir" / "a" / "x.txt").write_text("x")
    version = vol.upload_directory(tmp_path / "dir", "copied")
    assert vol.read_file("copied/a/x.txt") == b"x"
    assert vol.latest_version() == version
    with pytest.raises(NotFound, match="missing.bin"):
        vol.upload_file(tmp_path / "missing.bin", "m")
    with pytest.raises(NotFound, match="no-such-dir"):
        vol.upload_directory(tmp_path / "no-such-dir", "d")


def test_listdir_sorted_with_fields() -> None:
    vol = Volume.create("listing")
    with vol.batch_upload() as batch:
        for name in ["data/b.csv", "data/a.csv", "data/sub/c.csv", "top.txt"]:
            batch.put(name, name)
    for path in ["data", "data/", "/data/"]:
        entries = vol.listdir(path)
        assert [e.path for e in entries] == ["data/a.csv", "data/b.csv", "data/sub"], path
    assert [(e.type, e.size) for e in vol.listdir("data")] == [("file", 10), ("file", 10), ("dir", 0)]
    assert [e.path for e in vol.listdir("")] == ["data", "top.txt"]
    assert [e.path for e in vol.listdir("/")] == ["data", "top.txt"]
    assert [e.path for e in vol.listdir("", recursive=True)] == [
        "data", "data/a.csv", "data/b.csv", "data/sub", "data/sub/c.csv", "top.txt",
    ]
    entry = vol.listdir("data")[0]
    assert entry.mtime.tzinfo is not None
    assert entry.mtime.year >= 2024


def test_open_returns_seekable_stream() -> None:
    vol = Volume.create("streams")
    payload = bytes(range(256)) * 40_000
    vol.put_file("big.bin", payload)
    with vol.open("big.bin") as f:
        assert f.readable()
        assert f.seekable()
        assert f.read(10) == payload[:10]
        f.seek(1_000_000)
        assert f.tell() == 1_000_000
        assert f.read(5) == payload[1_000_000:1_000_005]
        f.seek(-3, io.SEEK_END)
        assert f.read() == payload[-3:]
        assert f.read(10) == b""
        f.seek(0)
        assert f.read() == payload
    # A stream keeps reading the version it was opened on.
    stream = vol.open("big.bin")
    vol.put_file("big.bin", b"replaced")
    assert stream.read(4) == payload[:4]
    assert vol.read_file("big.bin") == b"replaced"


def test_exception_types_and_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    vol = Volume.create("errors")
    vol.put_file("dir/file.txt", b"x")
    assert issubclass(NotFound, ChalkError)
    assert issubclass(NotFound, FileNotFoundError)

    with pytest.raises(NotFound, match="no-such-volume"):
        Volume("no-such-volume")
    with pytest.raises(NotFound, match="no-such-lineage"):
        Volume("errors", lineage="no-such-lineage")
    with pytest.raises(NotFound, match="dir/missing.txt"):
        vol.read_file("dir/missing.txt")
    with pytest.raises(NotFound, match="0123456789"):
        vol.at_version("0123456789")
    with pytest.raises(AlreadyExists, match="errors"):
        Volume.create("errors")
    with pytest.raises(InvalidPath, match=r"\.\./escape"):
        vol.put_file("../escape", b"x")
    with pytest.raises(InvalidPath, match="dir/file.txt"):
        vol.listdir("dir/file.txt")
    with pytest.raises(InvalidPath, match="'dir'|\"dir\""):
        vol.read_file("dir")
    with pytest.raises(InvalidPath, match="dir"):
        vol.put_file("dir", b"a file where a directory is")
    with pytest.raises(InvalidArgument, match="bad name"):
        Volume("bad name")
    with pytest.raises(InvalidArgument, match="on_conflict"):
        vol.sync(on_conflict="maybe")

    monkeypatch.setenv("CHALK_STORE", "file:///var/tmp/chalk-no-such-store-dir")
    with pytest.raises(StoreUnavailable, match="chalk-no-such-store-dir"):
        Volume("errors")


def test_conflict_names_the_paths() -> None:
    vol = Volume.create("conflicts")
    vol.put_file("same.txt", b"base")
    with pytest.raises(Conflict) as raised:
        with vol.batch_upload() as first:
            first.put("same.txt", b"first")
            first.put("only-first.txt", b"1")
            with vol.batch_upload() as second:
                second.put("same.txt", b"second")
    assert raised.value.paths == ["same.txt"]
    assert "same.txt" in str(raised.value)
    assert vol.read_file("same.txt") == b"second"
    assert not vol.exists("only-first.txt")

    # Writes to different paths rebase onto the moved head instead.
    with vol.batch_upload() as first:
        first.put("a.txt", b"a")
        with vol.batch_upload() as second:
            second.put("b.txt", b"b")
    assert vol.read_file("a.txt") == b"a"
    assert vol.read_file("b.txt") == b"b"


def test_at_version_is_read_only() -> None:
    vol = Volume.create("pinned")
    first = vol.put_file("f.txt", b"one")
    vol.put_file("f.txt", b"two")
    old = vol.at_version(first.id)
    assert old.read_only and old.lineage is None
    assert old.version == first
    assert old.read_file("f.txt") == b"one"
    assert old.latest_version() == first
    assert [e.path for e in old.listdir("")] == ["f.txt"]
    versions = len(vol.versions())

    with pytest.raises(ReadOnly, match=first.id):
        old.put_file("f.txt", b"three")
    with pytest.raises(ReadOnly):
        old.upload_directory("/var/tmp", "x")
    with pytest.raises(ReadOnly):
        with old.batch_upload() as batch:
            batch.put("g.txt", b"never")
    with pytest.raises(ReadOnly):
        old.remove("f.txt")
    assert issubclass(ReadOnly, PermissionError)
    assert len(vol.versions()) == versions
    # A version prefix and a Version object work as well as the id.
    assert vol.at_version(first.id[:12]).read_file("f.txt") == b"one"
    assert vol.at_version(first).read_file("f.txt") == b"one"


def test_fork_and_versions() -> None:
    vol = Volume.create("forks")
    base = vol.put_file("shared.txt", b"base")
    main_versions = vol.versions()

    fork = vol.fork(base)
    assert re.fullmatch(r"fork-[0-9a-z]{8}", fork.lineage), fork.lineage
    fork.put_file("result.txt", b"from the fork")
    named = vol.fork(base.id, lineage="experiment")
    assert named.lineage == "experiment"
    named.put_file("shared.txt", b"changed in experiment")

    assert vol.versions() == main_versions
    assert vol.read_file("shared.txt") == b"base"
    assert not vol.exists("result.txt")
    fork_versions = fork.versions()
    assert fork_versions[0] == base
    assert [v.lineage for v in fork_versions[1:]] == [fork.lineage]
    assert fork_versions[1].parent == base.id
    assert Volume("forks", lineage="experiment").read_file("shared.txt") == b"changed in experiment"

    everything = vol.versions(all_lineages=True)
    assert {v.id for v in everything} == {v.id for v in main_versions + fork_versions + named.versions()}
    assert [v.created_at for v in everything] == sorted(v.created_at for v in everything)

    changes = vol.diff(base, named.latest_version())
    assert [(c.path, c.kind) for c in changes] == [("shared.txt", "modified")]
    changes = vol.diff(base, fork.latest_version())
    assert [(c.path, c.kind, c.type, c.new_size) for c in changes] == [("result.txt", "added", "file", 13)]

    with pytest.raises(AlreadyExists, match="experiment"):
        vol.fork(base, lineage="experiment")


def test_list_create_delete() -> None:
    assert Volume.list() == []
    Volume.create("b-vol")
    Volume("a-vol", create_if_missing=True)
    assert [v.name for v in Volume.list()] == ["a-vol", "b-vol"]
    Volume("b-vol").delete()
    assert [v.name for v in Volume.list()] == ["a-vol"]
    with pytest.raises(NotFound):
        Volume("b-vol")


def test_sync_without_mounts_publishes_nothing() -> None:
    vol = Volume.create("quiet")
    assert vol.sync() == []
    assert len(vol.versions()) == 1


def test_version_fields() -> None:
    vol = Volume.create("fields")
    created = vol.latest_version()
    assert (created.seq, created.parent, created.lineage, created.message) == (1, None, "main", "create volume")
    put = vol.put_file("x", b"12345", message="my message")
    assert (put.seq, put.parent, put.lineage, put.message, put.files, put.bytes) == (2, created.id, "main", "my message", 1, 5)
    assert put.created_at >= created.created_at
    assert chalkcompute.Version is type(put)
