"""Tests of shared palettes: exact histograms, fitting, files."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from common_utils import photo

from gpu_kquant import ColorHistogram, Palette, quantize
from gpu_kquant.colors import color_set, pack
from gpu_kquant.palette import PaletteFileError


def test_histogram_sum_equals_histogram_of_concatenation() -> None:
    a, b = photo("chelsea"), photo("coffee")[:, :451]
    hist = ColorHistogram().add(a).add(b)
    together = color_set(pack(torch.from_numpy(np.concatenate([a, b]))))
    summed = hist.color_set()
    assert torch.equal(summed.keys, together.keys) and torch.equal(summed.counts, together.counts)
    assert hist.images == 2 and hist.pixels == a.shape[0] * a.shape[1] + b.shape[0] * b.shape[1]


def test_histograms_merge_like_one() -> None:
    imgs = [photo("chelsea"), photo("coffee"), photo("astronaut")]
    one = ColorHistogram()
    for img in imgs:
        one.add(img)
    parts = [ColorHistogram().add(img) for img in imgs]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(one.color_set().counts, merged.color_set().counts)


def test_rgba_histogram() -> None:
    img = photo("chelsea")[:50, :60]
    alpha = np.full((50, 60), 255, np.uint8)
    alpha[:10] = 0
    alpha[10:20] = 128
    rgba = np.dstack([img, alpha])
    cs = ColorHistogram().add(rgba).add(img).color_set()
    assert cs.channels == 4
    direct = color_set(
        pack(torch.from_numpy(np.concatenate([rgba, np.dstack([img, np.full((50, 60), 255, np.uint8)])]))), 4
    )
    assert torch.equal(cs.keys, direct.keys) and torch.equal(cs.counts, direct.counts)


def test_fit_and_apply_gives_identical_palettes() -> None:
    imgs = [photo("chelsea"), photo("coffee"), photo("astronaut")]
    pal = Palette.fit(imgs, 32)
    assert len(pal) <= 32 and pal.colors.dtype == np.uint8
    results = pal.apply(imgs)
    for q in results:
        np.testing.assert_array_equal(q.palette, pal.colors)
    # The shared palette serves each image worse than its own, but not by much.
    own = np.mean([quantize(img, 32).mse for img in imgs])
    shared = np.mean([q.mse for q in results])
    assert own < shared < 2.5 * own


@pytest.mark.parametrize("suffix", [".json", ".npy", ".gpl", ".png"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, suffix: str) -> None:
    img = photo("coffee")
    pal = Palette.fit([img], 16, space="oklab" if suffix == ".json" else "rgb")
    path = pal.save(tmp_path / f"palette{suffix}")
    loaded = Palette.load(path, space=None if suffix == ".json" else pal.space)
    assert loaded == pal
    np.testing.assert_array_equal(
        quantize(img, palette=loaded, space=loaded.space).indices, pal.apply([img])[0].indices
    )


def test_imagegpt_centres(tmp_path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centres)
    pal = Palette.load(tmp_path / "kmeans_centers.npy")
    assert len(pal) == 512
    np.testing.assert_array_equal(pal.colors, np.rint(127.5 * (centres + 1)).astype(np.uint8))
    q = quantize(photo("chelsea"), palette=pal)
    assert q.indices.dtype == np.uint16 and q.indices.max() < 512


def test_transparent_palette_png(tmp_path) -> None:
    pal = Palette(np.array([[0, 0, 0, 0], [10, 20, 30, 128], [200, 100, 0, 255]], np.uint8))
    assert Palette.load(pal.save(tmp_path / "p.png")) == pal


def test_bad_palettes(tmp_path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        Palette(np.zeros((3, 3), np.float32))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown palette file type"):
        Palette(np.zeros((3, 3), np.uint8)).save(tmp_path / "x.txt")
    from PIL import Image

    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="no palette"):
        Palette.load(tmp_path / "rgb.png")


# -- strict palette files (issue 12, items 8, 11 and 12) ---------------------------------------------


def _npy(path, array) -> object:
    np.save(path, array)
    return path


BAD_JSON = {
    "strings": '{"colors": [["a", "b", "c"]]}',
    "dict": '{"colors": {"r": 1}}',
    "nan": '{"colors": [[NaN, 0, 0]]}',
    "fraction": '{"colors": [[0.9, 0, 0]]}',
    "bool": "[[true, false, true]]",
    "ragged": "[[1, 2, 3], [1, 2, 3, 4]]",
    "range": "[[256, 0, 0]]",
    "empty": "[]",
    "scalar": "7",
    "space": '{"colors": [[1, 2, 3]], "space": 5}',
    "deep": "[" * 100_000 + "]" * 100_000,
    "not-json": "{",
}


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_malformed_json_palettes_are_one_line_value_errors(tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(BAD_JSON[name])
    with pytest.raises(PaletteFileError) as info:
        Palette.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 300


BAD_NPY = {
    "strings": np.array([["a", "b", "c"]]),
    "structured": np.zeros(3, dtype=[("r", "u1"), ("g", "u1"), ("b", "u1")]),
    "complex": np.ones((2, 3), np.complex64),
    "bool": np.ones((2, 3), bool),
    "nan": np.array([[np.nan, 0, 0]], np.float32),
    "float-outside": np.array([[0.9, 200, 0]], np.float32),  # floats are ImageGPT centres in [-1, 1]
    "negative": np.array([[-1, 0, 0]], np.int16),
    "shape": np.zeros((3, 5), np.uint8),
    "empty": np.zeros((0, 3), np.uint8),
    "datetime": np.zeros((2, 3), "datetime64[s]"),
}


@pytest.mark.parametrize("name", sorted(BAD_NPY))
def test_malformed_npy_palettes_are_refused_not_coerced(tmp_path, name: str) -> None:
    path = _npy(tmp_path / f"{name}.npy", BAD_NPY[name])
    with pytest.raises(PaletteFileError, match="^" + re.escape(f"{path}: ")):
        Palette.load(path)


def test_pickled_npy_is_refused(tmp_path) -> None:
    path = _npy(tmp_path / "obj.npy", np.array([[1, 2, object()]], dtype=object))
    with pytest.raises(PaletteFileError, match=r"not a readable \.npy"):
        Palette.load(path)


def test_imagegpt_centres_are_exact_at_the_ends(tmp_path) -> None:
    centres = np.array([[-1, 0, 1], [1, 1, 1], [-1, -1, -1]], np.float32)
    pal = Palette.load(_npy(tmp_path / "kmeans_centers.npy", centres))
    assert pal.colors.tolist() == [[0, 128, 255], [255, 255, 255], [0, 0, 0]]  # rint(127.5) = 128


@pytest.mark.parametrize(
    "text",
    [
        "not a palette\n1 2 3\n",
        "GIMP Palette\n1 2 x\n",
        "GIMP Palette\n1 2 300\n",
        "GIMP Palette\n0.9 2 3\n",
        "GIMP Palette\n",
    ],
    ids=["header", "word", "range", "fraction", "no-colours"],
)
def test_malformed_gpl_palettes(tmp_path, text: str) -> None:
    path = tmp_path / "p.gpl"
    path.write_text(text)
    with pytest.raises(PaletteFileError, match="^" + re.escape(f"{path}: ")):
        Palette.load(path)


def test_gpl_with_comments_and_names(tmp_path) -> None:
    path = tmp_path / "p.gpl"
    path.write_text("GIMP Palette\nName: x\nColumns: 4\n#\n# comment\n\n  0   0   0\tBlack\n255 128 1 Orange-ish\n")
    assert Palette.load(path).colors.tolist() == [[0, 0, 0], [255, 128, 1]]


def test_broken_palette_images(tmp_path) -> None:
    good = Palette(np.array([[0, 0, 0], [255, 0, 0]], np.uint8)).save(tmp_path / "good.png").read_bytes()
    (tmp_path / "half.png").write_bytes(good[:20])
    (tmp_path / "text.png").write_text("hello")
    for name in ("half.png", "text.png"):
        with pytest.raises(PaletteFileError, match="^" + re.escape(f"{tmp_path / name}: ")):
            Palette.load(tmp_path / name)


def test_only_regular_files_are_read(tmp_path) -> None:
    import os
    import threading

    fifo = tmp_path / "palette.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    errors: list[BaseException] = []

    def load() -> None:
        try:
            Palette.load(fifo)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "Palette.load blocked on a FIFO"
    assert len(errors) == 1 and isinstance(errors[0], PaletteFileError) and "not a regular file" in str(errors[0])
    (tmp_path / "folder.gpl").mkdir()
    with pytest.raises(PaletteFileError, match="not a regular file"):
        Palette.load(tmp_path / "folder.gpl")
    with pytest.raises(PaletteFileError, match="cannot read"):
        Palette.load(tmp_path / "missing.json")


@pytest.mark.parametrize("suffix", [".gpl", ".png"])
@pytest.mark.parametrize("dither", ["none", "ordered", "fs"])
def test_rgb_palette_gains_a_transparent_entry_for_transparent_images(tmp_path, suffix: str, dither: str) -> None:
    img = photo("coffee")[:40, :50]
    pal = Palette.load(Palette.fit([img], 8).save(tmp_path / f"p{suffix}"))
    assert pal.colors.shape[1] == 3
    alpha = np.full((40, 50), 255, np.uint8)
    alpha[:, :20] = 0
    q = pal.apply([np.dstack([img, alpha]), img], dither=dither)
    # the transparent image: the palette whole and in order, plus one clear entry last
    np.testing.assert_array_equal(q[0].palette[:-1, :3], pal.colors)
    assert (q[0].palette[:-1, 3] == 255).all() and q[0].palette[-1].tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(q[0].to_array()[..., 3], alpha)
    assert (q[0].indices[:, 20:] < len(pal)).all()
    np.testing.assert_array_equal(q[1].palette, pal.colors)  # an opaque image keeps the RGB palette
    assert q[0].indices.dtype == q[1].indices.dtype
