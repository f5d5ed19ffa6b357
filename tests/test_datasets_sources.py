"""Shard discovery, brace patterns, WebDataset key grouping and the resize modes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from dataset_utils import write_shard

from gpu_kquant.datasets.samples import ShardError, iter_tar, split_key
from gpu_kquant.datasets.sources import Shard, expand_braces, find_shards
from gpu_kquant.resize import parse_size, resize


def test_expand_braces() -> None:
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_find_shards(tmp_path: Path) -> None:
    write_shard(tmp_path / "d" / "00001.tar", 0, 1)
    write_shard(tmp_path / "d" / "00000.tar", 1, 1)
    (tmp_path / "d" / ".gpu_kquant-x.tmp").write_bytes(b"")
    shards, rest = find_shards([str(tmp_path / "d"), "photo.png"])
    assert [s.name for s in shards] == ["00000", "00001"] and rest == ["photo.png"]
    with pytest.raises(ValueError, match="do not exist"):
        find_shards([str(tmp_path / "d" / "{00000..00002}.tar")])


def test_split_key_follows_webdataset() -> None:
    assert split_key("a/b/000001.seg.png") == ("a/b/000001", "seg.png")
    assert split_key("000001.jpg") == ("000001", "jpg")
    assert split_key("README") is None


def test_grouping_and_image_choice(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("k1.txt", "k1.png", "k1.jpg", "k2.webp", "k2.cls"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    samples = list(iter_tar(Shard(path, "tar", "s")))
    assert [s.key for s in samples] == ["k1", "k2"]
    assert samples[0].image.name == "k1.jpg"  # jpg comes before png
    assert [m.name for m in samples[0].extras] == ["k1.txt", "k1.png"]
    assert samples[1].image.name == "k2.webp" and [m.ext for m in samples[1].extras] == ["cls"]


def test_tar_cut_between_members_is_truncated(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", 0, 2)
    data = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        end = tar.getmembers()[2].offset_data + 512 * -(-tar.getmembers()[2].size // 512)
    (tmp_path / "s.tar").write_bytes(data[:end])  # ends cleanly after a member, no end marker
    with pytest.raises(ShardError, match="truncated"):
        list(iter_tar(Shard(tmp_path / "s.tar", "tar", "s")))


def test_resize_modes() -> None:
    img = np.zeros((30, 60, 3), np.uint8)
    assert resize(img, (20, 20), "fit").shape == (10, 20, 3)
    assert resize(img, (20, 20), "fill").shape == (20, 20, 3)
    assert resize(img, (20, 20), "stretch").shape == (20, 20, 3)
    assert resize(np.zeros((5, 5, 4), np.uint8), (3, 3), "fill").shape == (3, 3, 4)
    assert parse_size("256x128") == (256, 128)
    with pytest.raises(ValueError):
        parse_size("256")


def test_resize_is_antialiased() -> None:
    """A one-pixel checkerboard shrunk 8x must average to mid-grey; point sampling would give 0 or 255."""
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    small = resize(np.repeat(board[..., None], 3, axis=2), (8, 8), "stretch")
    assert np.abs(small.astype(float) - 127.5).max() < 3
