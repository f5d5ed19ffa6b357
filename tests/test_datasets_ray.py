"""The Ray engine on shards: one task per shard, the same output bytes as the local engine."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from common_utils import cli
from dataset_utils import write_shard


def test_ray_gives_the_local_engines_bytes(tmp_path: Path) -> None:
    src = tmp_path / "shards"
    write_shard(src / "00000.tar", 0, 3, corrupt={1})
    write_shard(src / "00001.tar", 3, 2)
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert cli(src, "-k", 8, "-o", local, "--quiet", "--device", "cpu").returncode == 1  # the corrupt sample
    result = cli(src, "-k", 8, "-o", ray_out, "--quiet", "--device", "cpu", "--engine", "ray", timeout=600)
    assert result.returncode == 1, result.stderr
    assert "4 ok" in result.stderr and "1 failed" in result.stderr
    for name in ("00000.tar", "00001.tar"):
        assert (ray_out / name).read_bytes() == (local / name).read_bytes(), name
