"""chalk:// URLs through fsspec, pandas and pyarrow."""

from __future__ import annotations

import io

import fsspec
import pandas
import pyarrow
import pyarrow.dataset
import pyarrow.parquet
import pytest

from chalkcompute import NotFound, ReadOnly, Volume
from chalkcompute.filesystem import ChalkFileSystem


@pytest.fixture
def vol() -> Volume:
    return Volume.create("my-data")


def test_protocol_registered_by_entry_point() -> None:
    assert isinstance(fsspec.filesystem("chalk"), ChalkFileSystem)


def test_pandas_read_csv(vol: Volume) -> None:
    vol.put_file("data/train.csv", "a,b\n1,2\n3,4\n")
    frame = pandas.read_csv("chalk://my-data/data/train.csv")
    assert list(frame.columns) == ["a", "b"]
    assert frame["a"].tolist() == [1, 3]
    assert frame["b"].tolist() == [2, 4]


def test_pandas_writes_one_version_per_file(vol: Volume) -> None:
    versions = len(vol.versions())
    frame = pandas.DataFrame({"id": range(1000), "name": [f"row {i}" for i in range(1000)]})
    frame.to_parquet("chalk://my-data/out/table.parquet")
    frame.to_csv("chalk://my-data/out/table.csv", index=False)
    assert len(vol.versions()) == versions + 2
    assert pandas.read_parquet("chalk://my-data/out/table.parquet").equals(frame)
    assert pandas.read_csv("chalk://my-data/out/table.csv").equals(frame)


def test_pyarrow_dataset_over_directory(vol: Volume) -> None:
    with vol.batch_upload() as batch:
        for part in range(3):
            table = pyarrow.table({"id": list(range(part * 100, part * 100 + 100)), "part": [part] * 100})
            buffer = io.BytesIO()
            pyarrow.parquet.write_table(table, buffer)
            batch.put(f"parts/part-{part}.parquet", buffer.getvalue())

    dataset = pyarrow.dataset.dataset("my-data/parts", filesystem=fsspec.filesystem("chalk"), format="parquet")
    table = dataset.to_table()
    assert table.num_rows == 300
    assert sorted(table.column("id").to_pylist()) == list(range(300))
    assert dataset.to_table(filter=pyarrow.dataset.field("id") < 10).num_rows == 10
    assert pandas.read_parquet("chalk://my-data/parts/part-2.parquet")["id"].min() == 200


def test_huggingface_datasets_reads_csv(vol: Volume, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets

    vol.put_file("data/train.csv", "a,b\n1,2\n3,4\n")
    dataset = datasets.load_dataset("csv", data_files="chalk://my-data/data/train.csv", split="train")
    assert dataset.num_rows == 2
    assert list(dataset["a"]) == [1, 3]


def test_version_pinned_url(vol: Volume) -> None:
    first = vol.put_file("data/t.csv", "a\n1\n")
    vol.put_file("data/t.csv", "a\n2\n")
    assert pandas.read_csv(f"chalk://my-data@{first.id}/data/t.csv")["a"].tolist() == [1]
    assert pandas.read_csv("chalk://my-data/data/t.csv")["a"].tolist() == [2]

    fs = fsspec.filesystem("chalk")
    assert fs.ls(f"my-data@{first.id}/data", detail=False) == [f"my-data@{first.id}/data/t.csv"]
    with pytest.raises(ReadOnly):
        with fsspec.open(f"chalk://my-data@{first.id}/data/new.csv", "wb") as f:
            f.write(b"never")
    with pytest.raises(ReadOnly):
        fs.rm(f"my-data@{first.id}/data/t.csv")


def test_transaction_publishes_one_version(vol: Volume) -> None:
    fs = fsspec.filesystem("chalk")
    versions = len(vol.versions())
    with fs.transaction:
        with fs.open("my-data/a.txt", "wb") as f:
            f.write(b"a")
        with fs.open("chalk://my-data/b.txt", "wb") as f:
            f.write(b"b" * 3_000_000)
        assert not vol.exists("a.txt")
    assert len(vol.versions()) == versions + 1
    assert vol.read_file("a.txt") == b"a"
    assert vol.read_file("b.txt") == b"b" * 3_000_000


def test_transaction_that_raises_publishes_nothing(vol: Volume) -> None:
    fs = fsspec.filesystem("chalk")
    versions = vol.versions()
    with pytest.raises(RuntimeError, match="abort"):
        with fs.transaction:
            with fs.open("my-data/c.txt", "wb") as f:
                f.write(b"c")
            raise RuntimeError("abort")
    assert vol.versions() == versions
    assert not vol.exists("c.txt")


def test_write_that_raises_publishes_nothing(vol: Volume) -> None:
    fs = fsspec.filesystem("chalk")
    versions = vol.versions()
    with pytest.raises(RuntimeError, match="half"):
        with fs.open("my-data/partial.bin", "wb") as f:
            f.write(b"x" * 100)
            raise RuntimeError("half written")
    assert vol.versions() == versions
    assert not vol.exists("partial.bin")


def test_missing_paths_raise_file_not_found(vol: Volume) -> None:
    fs = fsspec.filesystem("chalk")
    with pytest.raises(FileNotFoundError):
        pandas.read_csv("chalk://my-data/missing.csv")
    with pytest.raises(NotFound, match="missing.csv"):
        fs.info("my-data/missing.csv")
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-volume/x")
    assert not fs.exists("my-data/missing.csv")


def test_listing_info_and_ranges(vol: Volume) -> None:
    vol.put_file("dir/file.bin", bytes(range(100)))
    fs = fsspec.filesystem("chalk")
    assert fs.ls("", detail=False) == ["my-data"]
    assert fs.ls("chalk://my-data", detail=False) == ["my-data/dir"]
    assert fs.info("my-data/dir")["type"] == "directory"
    info = fs.info("my-data/dir/file.bin")
    assert (info["name"], info["size"], info["type"]) == ("my-data/dir/file.bin", 100, "file")
    assert fs.cat_file("my-data/dir/file.bin", start=10, end=20) == bytes(range(10, 20))
    assert fs.cat_file("my-data/dir/file.bin", start=-5) == bytes(range(95, 100))
    assert fs.find("my-data") == ["my-data/dir/file.bin"]
    with fs.open("my-data/dir/file.bin", "rb") as f:
        f.seek(50)
        assert f.read(3) == bytes([50, 51, 52])


def test_mkdir_and_rm_publish_versions(vol: Volume) -> None:
    fs = fsspec.filesystem("chalk")
    versions = len(vol.versions())
    fs.mkdir("my-data/empty/dir")
    fs.pipe_file("my-data/gone.txt", b"soon removed")
    fs.rm("my-data/gone.txt")
    assert len(vol.versions()) == versions + 3
    assert vol.stat("empty/dir").type == "dir"
    assert not vol.exists("gone.txt")


def test_copy_and_move(vol: Volume) -> None:
    fs = fsspec.filesystem("chalk")
    payload = bytes(range(256)) * 20_000
    vol.put_file("src/big.bin", payload)
    pinned = vol.latest_version().id
    versions = len(vol.versions())

    fs.cp_file("my-data/src/big.bin", "my-data/copy/big.bin")
    assert vol.read_file("copy/big.bin") == payload
    assert len(vol.versions()) == versions + 1

    # A pinned version is a valid source, and copy() takes whole trees.
    fs.copy(f"my-data@{pinned}/src", "my-data/tree", recursive=True)
    assert vol.read_file("tree/big.bin") == payload

    fs.mv("my-data/copy/big.bin", "my-data/moved.bin")
    assert vol.read_file("moved.bin") == payload
    assert not vol.exists("copy/big.bin")

    with pytest.raises(NotFound):
        fs.cp_file("my-data/missing.bin", "my-data/x.bin")
    with pytest.raises(ReadOnly):
        fs.cp_file("my-data/moved.bin", f"my-data@{pinned}/x.bin")
