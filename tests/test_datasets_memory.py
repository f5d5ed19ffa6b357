"""Memory stays flat with the number and the size of shards: samples stream, nothing is read whole.

Measured exactly rather than by RSS (which moves with allocator caches and lazily loaded
library pages): tracemalloc's peak of Python objects (every sample's bytes, decoded
arrays) plus the peak of Arrow's buffers in a pool of their own. Each sample carries a
1 MiB pass-through member, so a reader that held a whole 48-sample shard or Parquet file
would peak above 48 MiB; a streaming one holds a batch (4 samples here) at a time.
"""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from dataset_utils import jpeg

from gpu_kquant.datasets import DatasetOptions, find_shards, process_shard, run_shards
from gpu_kquant.options import FitOptions

MIB = 1 << 20
SAMPLES = 48  # 48 MiB of pass-through data in one shard or file
BOUND = 16 * MIB  # a third of it: a batch of 4 samples with its copies fits, a whole file does not
_NOISE = os.urandom(2 * MIB)


def _blob(i: int) -> bytes:
    """1 MiB of incompressible bytes, different for every sample."""
    start = (i * 9973) % MIB
    return _NOISE[start : start + MIB]


def _shard(path: Path, start: int, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            for ext, data in (("jpg", jpeg(i, (8, 8))), ("bin", _blob(i))):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _options(out: Path, **kw: object) -> DatasetOptions:
    return DatasetOptions(out=out, fit=FitOptions(k=2, n_init=1), batch_size=4, workers=1, **kw)  # type: ignore[arg-type]


def _peak(work: Callable[[], object], pa: object = None) -> int:
    """Peak bytes held while ``work`` runs: Python objects plus (with ``pa``) Arrow buffers."""
    pool = old = None
    if pa is not None:
        old = pa.default_memory_pool()  # type: ignore[attr-defined]
        pool = pa.proxy_memory_pool(old)  # type: ignore[attr-defined]  # its own peak, from zero
        pa.set_memory_pool(pool)  # type: ignore[attr-defined]
    tracemalloc.start()
    try:
        work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        if pa is not None:
            pa.set_memory_pool(old)  # type: ignore[attr-defined]
    return peak + (pool.max_memory() if pool is not None else 0)  # type: ignore[attr-defined]


def test_one_big_tar_shard_streams(tmp_path: Path) -> None:
    _shard(tmp_path / "big.tar", 0, SAMPLES)
    (shard,), _ = find_shards([str(tmp_path / "big.tar")])
    rows: list = []
    peak = _peak(lambda: rows.extend(process_shard(shard, _options(tmp_path / "out"))))
    assert [r.status for r in rows] == ["ok"] * SAMPLES
    assert (tmp_path / "out" / "big.tar").stat().st_size > SAMPLES * MIB  # everything was written
    assert peak < BOUND, f"peak {peak / MIB:.1f} MiB for a {SAMPLES} MiB shard"


def test_memory_does_not_grow_with_the_number_of_shards(tmp_path: Path) -> None:
    """Six shards one after another peak like one: nothing accumulates from shard to shard."""
    src = tmp_path / "shards"
    src.mkdir()
    for s in range(6):
        _shard(src / f"{s:05d}.tar", 8 * s, 8)
    shards, _ = find_shards([str(src)])
    one, six = (tmp_path / "one", tmp_path / "six")
    rows: list = []
    peak_one = _peak(lambda: run_shards(shards[:1], _options(one), rows.append, parallel=1))
    peak_six = _peak(lambda: run_shards(shards, _options(six), rows.append, parallel=1))
    assert sum(r.status == "ok" for r in rows) == 8 + SAMPLES
    assert peak_six < BOUND and peak_six < peak_one + 2 * MIB, (peak_one / MIB, peak_six / MIB)


def test_a_parquet_file_is_read_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """48 rows of 1 MiB in row groups of 2; batches bounded at 2 MiB (read and written) instead of the default 64."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from gpu_kquant.datasets import parquet

    monkeypatch.setattr(parquet, "BATCH_BYTES", 2 * MIB)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(SAMPLES)],
            "jpg": pa.array([jpeg(i, (8, 8)) for i in range(SAMPLES)], pa.binary()),
            "blob": pa.array([_blob(i) for i in range(SAMPLES)], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=2)
    del table
    (shard,), _ = find_shards([str(tmp_path / "big.parquet")])
    rows: list = []
    peak = _peak(lambda: rows.extend(process_shard(shard, _options(tmp_path / "out"))), pa)
    assert [r.status for r in rows] == ["ok"] * SAMPLES
    out = pq.ParquetFile(tmp_path / "out" / "big.parquet")
    assert out.metadata.num_rows == SAMPLES and out.metadata.num_row_groups > 1
    assert peak < BOUND, f"peak {peak / MIB:.1f} MiB for a {SAMPLES} MiB file"
