"""The Ray engine on shards and Parquet: one task per shard, the same output bytes as the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from common_utils import cli
from dataset_utils import CORRUPT, caption, jpeg, write_shard


def _parquet(path: Path, n: int) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = [CORRUPT if i == 1 else jpeg(i) for i in range(n)]
    table = pa.table({"key": [f"p{i:08d}" for i in range(n)], "jpg": pa.array(images, pa.binary())})
    table = table.append_column("caption", pa.array([caption(i).decode() for i in range(n)]))
    pq.write_table(table, path, row_group_size=2)


def test_ray_gives_the_local_engines_bytes(tmp_path: Path) -> None:
    """One Ray run (they are slow) over two tar shards and a Parquet file, each with a corrupt sample or not."""
    src = tmp_path / "shards"
    write_shard(src / "00000.tar", 0, 3, corrupt={1})
    write_shard(src / "00001.tar", 3, 2)
    _parquet(src / "part.parquet", 3)
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert cli(src, "-k", 8, "-o", local, "--quiet", "--device", "cpu").returncode == 1  # the corrupt samples
    result = cli(src, "-k", 8, "-o", ray_out, "--quiet", "--device", "cpu", "--engine", "ray", timeout=600)
    assert result.returncode == 1, result.stderr
    assert "6 ok" in result.stderr and "2 failed" in result.stderr
    for name in ("00000.tar", "00001.tar", "part.parquet"):
        assert (ray_out / name).read_bytes() == (local / name).read_bytes(), name
