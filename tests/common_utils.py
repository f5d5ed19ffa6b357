"""Shared test helpers: device parametrization and real photos bundled with dependencies."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

needs_cuda = pytest.mark.needs_cuda
ROOT = Path(__file__).resolve().parents[1]


def cli(
    *args: object, timeout: float = 300, drop_env: tuple[str, ...] = (), **kwargs: object
) -> subprocess.CompletedProcess:
    """Run ``python -m gpu_kquant ARGS`` from this checkout, as a user would."""
    return python("-m", "gpu_kquant", *args, timeout=timeout, drop_env=drop_env, **kwargs)


def python(
    *args: object, timeout: float = 300, drop_env: tuple[str, ...] = (), **kwargs: object
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in a fresh interpreter that imports gpu_kquant from this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


def recorded_outputs(out: Path) -> set[str]:
    """Paths (relative to ``out``) its manifest records as written, not merely claimed.

    A run killed between renaming an output into place and recording it leaves that
    output unrecorded, and a rerun redoes it; only recorded outputs are skipped.
    """
    path = out / "gpu_kquant_manifest.jsonl"
    paths = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):  # as the manifest's reader does with a torn line
            paths.add(json.loads(line).get("path"))
    return paths - {None}


def cpu_and_cuda() -> tuple:
    """Parametrize over CPU and, marked ``needs_cuda``, CUDA."""
    return ("cpu", pytest.param("cuda", marks=needs_cuda))


@functools.cache
def photo(name: str) -> np.ndarray:
    """A real photo bundled with scikit-learn or scikit-image, (H, W, 3) uint8, read-only."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.ascontiguousarray(img[..., :3])
    img.flags.writeable = False
    return img


def _s15(x: float) -> bytes:
    return round(x * 65536).to_bytes(4, "big", signed=True)


def linear_rgb_icc() -> bytes:
    """A minimal ICC v2 RGB profile: sRGB primaries with a linear (gamma 1) curve.

    Pixels tagged with it hold linear light, so converting them to sRGB must brighten
    mid-tones (linear 0.5 is sRGB 188) — a conversion that cannot go unnoticed.
    """
    import struct

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)

    text = b"Linear sRGB test profile\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 4 + b"\0" * 4 + b"\0" * 3 + b"\0" * 67
    curve = b"curv\0\0\0\0" + struct.pack(">I", 0)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"none"
        + bytes([2, 0x10, 0, 0])
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 16
        + b"\0" * 8
        + struct.pack(">I", 0)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def read_report(path: Path) -> dict[str, dict]:
    """Report rows keyed by input file name."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(r["input"]).name: r for r in rows}


def digest(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def small_folder(tmp_path: Path, names: tuple[str, ...] = ("chelsea", "coffee", "astronaut")) -> Path:
    """``tmp_path/in`` with a 120x160 crop of each named photo as PNG."""
    src = tmp_path / "in"
    src.mkdir()
    for name in names:
        Image.fromarray(photo(name)[:120, :160]).save(src / f"{name}.png")
    return src


def plte(path: Path) -> bytes:
    """The PLTE chunk of a PNG file."""
    data = path.read_bytes()
    at = data.index(b"PLTE")
    return data[at - 4 : at + 4 + int.from_bytes(data[at - 4 : at], "big")]


# Ops that make the host wait for a CUDA device: reading a value, or an output sized by the data.
_SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
}


class SyncCounter(TorchDispatchMode):
    """Counts, on CPU tensors, the ops and host reads that would sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        sized_by_data = name == "repeat_interleave" and kwargs.get("output_size") is None
        masks = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if name in _SYNC_OPS or sized_by_data or masks:
            self.events.append(name)
        return func(*args, **kwargs)


def count_syncs(fn: Callable[[], object]) -> list[str]:
    """The ops and host reads ``fn`` makes that would make the host wait on CUDA (run on CPU tensors)."""
    counter = SyncCounter()
    with pytest.MonkeyPatch.context() as mp:
        for method in ("cpu", "numpy", "tolist", "item"):
            original = getattr(torch.Tensor, method)

            def wrapped(self: torch.Tensor, *a: Any, _m: str = method, _o: Any = original, **kw: Any) -> Any:
                counter.events.append(_m)
                return _o(self, *a, **kw)

            mp.setattr(torch.Tensor, method, wrapped)
        with counter:
            fn()
    return counter.events


def assert_meets_issue_15_targets(img: np.ndarray, k: int, tmp_path: Path) -> None:
    """``--dither adaptive`` against pngquant's default dithering at ``k``: SSIM at least as high,
    blurred PSNR 0.3 dB higher, at most 1.05x the bytes (issue 15's three targets)."""
    from gpu_kquant import quantize
    from gpu_kquant.imagefiles import encode_png
    from gpu_kquant.metrics import blurred_psnr, ssim

    Image.fromarray(img).save(tmp_path / "in.png")
    out_png = tmp_path / "out.png"
    subprocess.run(["pngquant", "--force", "--output", str(out_png), str(k), str(tmp_path / "in.png")], check=True)
    ref = np.asarray(Image.open(out_png).convert("RGB"))
    q = quantize(img, k, dither="adaptive", device="cpu")
    assert ssim(img, q.to_rgb()) >= ssim(img, ref)
    assert blurred_psnr(img, q.to_rgb()) >= blurred_psnr(img, ref) + 0.3
    assert len(encode_png(q.palette, q.indices)) <= 1.05 * out_png.stat().st_size


def c_or_fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> str:
    """For a fixture with params ["c", "fallback"]: the compiled kernel ``module.name`` as built, or
    None (so the code that stands in without it runs); skips where the kernel did not build."""
    if request.param == "fallback":
        monkeypatch.setattr(module, name, None)
    elif getattr(module, name) is None:
        pytest.skip(f"{module.__name__}.{name}: the C kernel did not build")
    return str(request.param)
