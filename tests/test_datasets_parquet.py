"""Parquet in and out: a plain binary image column and a Hugging Face {bytes, path} struct column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from common_utils import cli
from dataset_utils import CORRUPT, caption, colours, jpeg, truncate

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from gpu_kquant.datasets.options import DatasetOptions  # noqa: E402
from gpu_kquant.datasets.shard import process_shard  # noqa: E402
from gpu_kquant.datasets.sources import find_shards  # noqa: E402
from gpu_kquant.options import FitOptions  # noqa: E402


def _plain(path: Path, n: int, corrupt: int | None = None) -> None:
    images = [CORRUPT if i == corrupt else jpeg(i) for i in range(n)]
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "jpg": pa.array(images, pa.binary()),
            "caption": [caption(i).decode() for i in range(n)],
            "width": pa.array([40] * n, pa.int64()),
            "score": [0.5 + i for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=2)


def _hf(path: Path, n: int) -> None:
    struct = [{"bytes": jpeg(i), "path": f"img_{i}.jpg"} for i in range(n)]
    table = pa.table({"image": struct, "text": [caption(i).decode() for i in range(n)]})
    pq.write_table(table, path)


def _run(path: Path, out: Path, **kw: object) -> list:
    shards, _ = find_shards([str(path)])
    return process_shard(shards[0], DatasetOptions(out=out, fit=FitOptions(k=6), **kw))


def test_plain_binary_column(tmp_path: Path) -> None:
    _plain(tmp_path / "part.parquet", 5, corrupt=3)
    rows = _run(tmp_path / "part.parquet", tmp_path / "out")
    assert [r.status for r in rows] == ["ok", "ok", "ok", "failed", "ok"]
    assert "000000003" in rows[3].input and rows[3].reason
    table = pq.read_table(tmp_path / "out" / "part.parquet")
    assert table.schema.field("score").type == pa.float64() and "jpg" not in table.schema.names
    out = table.to_pylist()
    assert [r["key"] for r in out] == ["000000000", "000000001", "000000002", "000000004"]
    for row in out:
        i = int(row["key"])
        assert row["caption"] == caption(i).decode() and row["score"] == 0.5 + i  # unchanged
        assert colours(row["image"]) <= 6
        palette = np.frombuffer(row["palette"], np.uint8).reshape(row["colors"], -1)
        assert palette.shape[1] == 3 and (row["width"], row["height"]) == (40, 32)


def test_hf_struct_column_through_the_cli(tmp_path: Path) -> None:
    _hf(tmp_path / "train.parquet", 3)
    result = cli(tmp_path / "train.parquet", "-k", 6, "-o", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    out = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [r["key"] for r in out] == ["000000000", "000000001", "000000002"]
    assert [r["text"] for r in out] == [caption(i).decode() for i in range(3)]
    assert all(colours(r["image"]) <= 6 for r in out)


def test_named_column_and_webdataset_output(tmp_path: Path) -> None:
    import tarfile

    _hf(tmp_path / "train.parquet", 2)
    rows = _run(tmp_path / "train.parquet", tmp_path / "out", image_column="image", output_format="webdataset")
    assert [r.status for r in rows] == ["ok", "ok"]
    with tarfile.open(tmp_path / "out" / "train.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile("000000001.text").read() == caption(1)
    assert names[:3] == ["000000000.png", "000000000.kquant.json", "000000000.text"]


def test_truncated_parquet_is_one_failed_row(tmp_path: Path) -> None:
    _plain(tmp_path / "cut.parquet", 4)
    truncate(tmp_path / "cut.parquet")
    rows = _run(tmp_path / "cut.parquet", tmp_path / "out")
    assert len(rows) == 1 and rows[0].status == "failed" and "Parquet" in rows[0].reason
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_missing_image_column_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    rows = _run(tmp_path / "t.parquet", tmp_path / "out")
    assert rows[0].status == "failed" and "--image-column" in rows[0].reason


def test_quality_through_the_cli(tmp_path: Path) -> None:
    """--quality on Parquet: k per row, rows below the minimum left out, the exit code says so."""
    from dataset_utils import decode, psnr

    _plain(tmp_path / "part.parquet", 6)
    result = cli(tmp_path / "part.parquet", "-k", 6, "--quality", "30-32", "-o", tmp_path / "out", "--quiet")
    assert result.returncode == 1 and "quality" in result.stderr, result.stderr  # refused rows count as failures
    out = pq.read_table(tmp_path / "out" / "part.parquet").to_pylist()
    assert 2 <= len(out) < 6
    for row in out:
        measured = psnr(decode(jpeg(int(row["key"]))), decode(row["image"]))
        assert measured == pytest.approx(row["psnr"], abs=0.01) and measured >= 30 - 0.01
        assert colours(row["image"]) == row["colors"] <= 6
        assert row["colors"] == 6 or measured >= 32 - 0.01  # fewer colours only when they reach the target
    assert any(row["colors"] < 6 for row in out)
