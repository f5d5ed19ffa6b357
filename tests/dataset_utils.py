"""Helpers for the dataset tests: img2dataset-style shards and Parquet files built from real photos."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from common_utils import photo
from PIL import Image

CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


def jpeg(index: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small JPEG cut from a real photo (a different crop per index)."""
    base = photo("astronaut")
    w, h = size
    y, x = (index * 37) % (base.shape[0] - h), (index * 53) % (base.shape[1] - w)
    buf = io.BytesIO()
    Image.fromarray(base[y : y + h, x : x + w]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def caption(index: int) -> bytes:
    return f"a photo, number {index} \u2014 caf\u00e9".encode()


def meta(index: int) -> bytes:
    return json.dumps({"url": f"http://example.com/{index}.jpg", "key": f"{index:09d}", "status": "success"}).encode()


def write_shard(path: Path, start: int, count: int, corrupt: set[int] = frozenset(), size=(40, 32)) -> list[str]:
    """An img2dataset webdataset shard: per sample <key>.jpg, <key>.txt, <key>.json. Returns the keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            key = f"{i:09d}"
            keys.append(key)
            image = CORRUPT if i in corrupt else jpeg(i, size)
            for ext, data in (("jpg", image), ("txt", caption(i)), ("json", meta(i))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return keys


def truncate(path: Path) -> None:
    """Cut a file in the middle, as a crashed writer would leave it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def colours(data: bytes) -> int:
    """Distinct RGB(A) colours of an encoded image."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGBA"))
    return len(np.unique(arr.reshape(-1, 4), axis=0))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
