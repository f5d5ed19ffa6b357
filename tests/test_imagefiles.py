"""Tests of decoding every kind of input and of the palette encoders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from common_utils import linear_rgb_icc, photo
from PIL import Image, ImageCms

from gpu_kquant.imagefiles import DecodeError, encode, encode_png, load_image, write_atomic


def save(img: Image.Image, path: Path, fmt: str | None = None, **options: object) -> Path:
    img.save(path, fmt, **options)
    return path


@pytest.fixture
def rgb() -> Image.Image:
    return Image.fromarray(photo("chelsea")[:60, :80])


def test_rgb_png_and_jpeg(tmp_path: Path, rgb: Image.Image) -> None:
    d = load_image(save(rgb, tmp_path / "a.png"))
    np.testing.assert_array_equal(d.pixels, np.asarray(rgb))
    assert d.notes == []
    jpg = load_image(save(rgb, tmp_path / "a.jpg", quality=95))
    assert jpg.pixels.shape == (60, 80, 3)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr"])
def test_opaque_modes_become_rgb(tmp_path: Path, rgb: Image.Image, mode: str) -> None:
    img = rgb.convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    d = load_image(save(img, tmp_path / f"a.{fmt.lower()}", fmt))
    assert d.pixels.shape == (60, 80, 3) and d.pixels.dtype == np.uint8
    if mode == "L":
        np.testing.assert_array_equal(d.pixels[..., 0], np.asarray(img))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_modes_keep_alpha(tmp_path: Path, rgb: Image.Image, mode: str) -> None:
    rgba = rgb.convert("RGBA")
    alpha = np.zeros((60, 80), np.uint8)
    alpha[:, 40:] = 255
    alpha[:, 30:40] = 128
    rgba.putalpha(Image.fromarray(alpha))
    img = rgba.convert(mode) if mode != "PA" else rgba.convert("RGB").convert("P").convert("PA")
    if mode == "PA":
        img.putalpha(Image.fromarray(alpha))
        img = img.convert("RGBA")
    d = load_image(save(img, tmp_path / "a.png"))
    assert d.pixels.shape == (60, 80, 4)
    np.testing.assert_array_equal(d.pixels[..., 3], alpha)


def test_palette_with_transparency_index(tmp_path: Path, rgb: Image.Image) -> None:
    p = rgb.quantize(8)
    d = load_image(save(p, tmp_path / "a.png", transparency=0))
    assert d.pixels.shape[2] == 4
    np.testing.assert_array_equal(d.pixels[..., 3] == 0, np.asarray(p) == 0)


def test_opaque_rgba_is_rgb(tmp_path: Path, rgb: Image.Image) -> None:
    d = load_image(save(rgb.convert("RGBA"), tmp_path / "a.png"))
    assert d.pixels.shape == (60, 80, 3)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(256 * 4, dtype=np.uint16).reshape(16, 64) * 64).astype(np.uint16)
    d = load_image(save(Image.fromarray(ramp), tmp_path / "a.png"))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(d.pixels[..., 0], expected)
    assert "16-bit reduced to 8-bit" in d.notes


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), "red")
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = load_image(save(img, tmp_path / "a.jpg", exif=exif, quality=100))
    assert d.pixels.shape == (40, 20, 3)
    assert d.pixels[2, 10, 2] > 200  # the stripe is now on top
    assert any("EXIF orientation 6" in n for n in d.notes)


def test_icc_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (128, 128, 128))
    d = load_image(save(img, tmp_path / "a.png", icc_profile=linear_rgb_icc()))
    assert abs(int(d.pixels[0, 0, 0]) - 188) <= 1  # linear 0.5 is sRGB 188
    assert "ICC profile converted to sRGB" in d.notes
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    same = load_image(save(img, tmp_path / "b.png", icc_profile=srgb))
    assert int(same.pixels[0, 0, 0]) == 128 and same.notes == []


def test_animation_takes_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "green", "blue")]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    d = load_image(path)
    assert tuple(d.pixels[0, 0]) == (255, 0, 0)
    assert "first frame only (of 3)" in d.notes


def test_wrong_extension_is_decoded_by_content(tmp_path: Path, rgb: Image.Image) -> None:
    d = load_image(save(rgb, tmp_path / "a.jpg", "PNG"))
    np.testing.assert_array_equal(d.pixels, np.asarray(rgb))
    assert any("content is PNG" in n for n in d.notes)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all" * 10, "not a recognised image format"),
    ],
)
def test_bad_files_give_one_line_reasons(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_truncated_files(tmp_path: Path, rgb: Image.Image) -> None:
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        rgb.save(buf, fmt)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(DecodeError, match="truncated or corrupt"):
            load_image(path)


def test_missing_file_and_pixel_limit(tmp_path: Path, rgb: Image.Image) -> None:
    with pytest.raises(DecodeError, match="cannot read file"):
        load_image(tmp_path / "nope.png")
    path = save(rgb, tmp_path / "a.png")
    with pytest.raises(DecodeError, match="above the limit of 100"):
        load_image(path, max_pixels=100)


@pytest.mark.parametrize("n", [2, 3, 4, 9, 16, 17, 256])
def test_png_round_trip_with_minimal_depth(n: int) -> None:
    rng = np.random.default_rng(n)
    palette = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    indices = rng.integers(0, n, (31, 45)).astype(np.uint8)
    data = encode_png(palette, indices)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P"
    expected_bits = 1 if n <= 2 else 2 if n <= 4 else 4 if n <= 16 else 8
    assert data[24] == expected_bits  # IHDR bit depth
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), palette[indices])


def test_png_transparency_chunk_is_short() -> None:
    palette = np.array([[0, 0, 0, 0], [9, 9, 9, 100], [1, 2, 3, 255], [4, 5, 6, 255]], np.uint8)
    indices = np.array([[0, 1, 2, 3]], np.uint8)
    data = encode_png(palette, indices)
    trns = data.index(b"tRNS")
    assert int.from_bytes(data[trns - 4 : trns], "big") == 2  # stops after the last translucent entry
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")), palette[indices])


def test_png_is_smaller_than_pillows_adaptive_filtering() -> None:
    from gpu_kquant import quantize

    q = quantize(photo("astronaut"), 64)
    buf = io.BytesIO()
    q.to_pil().save(buf, "PNG", compress_level=6)
    assert len(encode_png(q.palette, q.indices, 6)) < len(buf.getvalue())


@pytest.mark.parametrize("fmt", ["gif", "webp", "npz"])
def test_other_formats_round_trip(fmt: str) -> None:
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    indices = rng.integers(0, 12, (20, 30)).astype(np.uint8)
    data, notes = encode(fmt, palette, indices)
    if fmt == "npz":
        arrays = np.load(io.BytesIO(data))
        np.testing.assert_array_equal(arrays["indices"], indices)
        np.testing.assert_array_equal(arrays["palette"], palette)
    else:
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), palette[indices])
    assert notes == []


def test_gif_and_webp_keep_transparency() -> None:
    palette = np.array([[0, 0, 0, 0], [200, 10, 10, 255], [10, 200, 10, 128]], np.uint8)
    indices = np.array([[0, 1, 2, 1]], np.uint8)
    webp, _ = encode("webp", palette, indices)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(webp)).convert("RGBA")), palette[indices])
    gif, notes = encode("gif", palette, indices)
    assert np.asarray(Image.open(io.BytesIO(gif)).convert("RGBA"))[0, 0, 3] == 0
    assert any("partial alpha" in n for n in notes)


def test_write_atomic_leaves_no_temp_and_usual_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "out.bin"
    write_atomic(dest, b"abc")
    assert dest.read_bytes() == b"abc"
    assert [p.name for p in dest.parent.iterdir()] == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


# -- issue 12, items 15 and 16 -------------------------------------------------------------------------


def test_32_bit_signed_tiff_is_scaled_not_clipped(tmp_path: Path) -> None:
    """Pillow writes mode I as a signed 32-bit TIFF (SampleFormat 2): -2**31 is black, 2**31 - 1 white."""
    values = np.linspace(-(2**31), 2**31 - 1, 64).astype(np.int64)
    arr = values.astype(np.int32).reshape(8, 8)
    d = load_image(save(Image.fromarray(arr), tmp_path / "a.tif"))
    expected = np.rint((values + 2**31) * 255 / (2**32 - 1)).astype(np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(d.pixels[..., 0], expected)
    assert d.pixels[..., 0].min() == 0 and d.pixels[..., 0].max() == 255 and len(np.unique(d.pixels)) > 32
    assert "32-bit signed integer greyscale scaled to 8-bit" in d.notes
    assert not any("16-bit" in n for n in d.notes)


def test_32_bit_unsigned_tiff_is_scaled_not_clipped(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")  # Pillow cannot write unsigned 32-bit samples
    values = np.linspace(0, 2**32 - 1, 64).astype(np.uint64)
    tifffile.imwrite(tmp_path / "a.tif", values.astype(np.uint32).reshape(8, 8))
    d = load_image(tmp_path / "a.tif")
    expected = np.rint(values.astype(np.float64) * 255 / (2**32 - 1)).astype(np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(d.pixels[..., 0], expected)
    assert "32-bit integer greyscale scaled to 8-bit" in d.notes


def test_16_bit_pgm_read_as_mode_i_is_still_16_bit(tmp_path: Path) -> None:
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    path = tmp_path / "a.pgm"
    path.write_bytes(b"P5\n8 8\n65535\n" + ramp.astype(">u2").tobytes())
    d = load_image(path)
    np.testing.assert_array_equal(d.pixels[..., 0], np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert "16-bit reduced to 8-bit" in d.notes


@pytest.mark.parametrize("value", [0, 9, 100])
def test_invalid_exif_orientation_is_reported_as_ignored(tmp_path: Path, rgb: Image.Image, value: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = value
    path = save(rgb, tmp_path / "a.png", exif=exif)
    d = load_image(path)
    np.testing.assert_array_equal(d.pixels, np.asarray(rgb))  # not rotated
    assert not any("applied" in n for n in d.notes), d.notes
    assert f"EXIF orientation {value} is invalid (not 1..8); ignored" in d.notes


def test_png_with_a_bad_checksum_is_reported_as_damaged(tmp_path: Path, rgb: Image.Image) -> None:
    data = bytearray(save(rgb, tmp_path / "good.png").read_bytes())
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith("corrupt or damaged PNG file") and "checksum" in message, message
    assert "not a recognised" not in message and "\n" not in message


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file of many pixels (a decompression bomb) is refused from its header, never decoded."""
    from PIL import ImageFile

    from gpu_kquant.imagefiles import estimated_decoded_bytes

    path = save(Image.new("L", (4000, 3000)), tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000

    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(DecodeError, match="above the limit"):
            load_image(path, max_pixels=10_000_000)
        estimate = estimated_decoded_bytes(path)
    assert estimate == 4000 * 3000 * (1 + 4 + 3)
    assert estimate >= load_image(path).pixels.nbytes
    with pytest.raises(DecodeError, match="empty file"):
        estimated_decoded_bytes(save_bytes(tmp_path / "empty.png", b""))


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_decoding_leaves_pillow_and_warning_settings_alone(tmp_path: Path, rgb: Image.Image) -> None:
    import warnings

    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    load_image(save(rgb, tmp_path / "a.png"), max_pixels=10**12)
    assert limit == Image.MAX_IMAGE_PIXELS and warnings.filters == filters


def _old_encode_png_bytes(palette: np.ndarray, indices: np.ndarray) -> int:
    """Size of main's encoder output (commit 2597b82): minimal bit depth, filter None, zlib 9 up to 8 colours else 6."""
    import zlib

    from gpu_kquant.pngfile import _pack_rows

    n = palette.shape[0]
    bits = 1 if n <= 2 else 2 if n <= 4 else 4 if n <= 16 else 8
    rows = _pack_rows(np.ascontiguousarray(indices, dtype=np.uint8), bits)
    raw = np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows], 1)
    header = 8 + 25 + (12 + 3 * n) + 12  # signature, IHDR, PLTE, IEND (RGB palettes: no tRNS)
    return header + 12 + len(zlib.compress(raw.tobytes(), 9 if n <= 8 else 6))


# PNG bytes of `quantize(sample, k)` + encode_png on main before the encoder change (commit 2597b82,
# CPU, default options), measured by `python -m benchmarks.quality --sections bytes` on 2026-12-02.
# They also depend on the fitted palette: a change in k-means may move them.
BYTES_BEFORE = {
    ("astronaut", 16): 40048,
    ("chelsea", 16): 31394,
    ("coffee", 16): 47183,
}  # k=64 on main: astronaut 75473, chelsea 52889, coffee 86603 (left out of the test for time)


@pytest.mark.parametrize(("name", "k"), sorted(BYTES_BEFORE))
def test_png_bytes_of_bundled_photos_are_not_larger_than_before(name: str, k: int) -> None:
    from gpu_kquant import quantize

    path = Path(__file__).resolve().parents[1] / "gpu_kquant" / "samples" / f"{name}.png"
    q = quantize(np.asarray(Image.open(path).convert("RGB")), k, device="cpu")
    data = encode_png(q.palette, q.indices)
    assert len(data) <= _old_encode_png_bytes(q.palette, q.indices)
    # The smallest-file setting (level 9 and the 8-bit trial; the default keeps level 6
    # above 8 colours for speed) stays below the sizes measured before the encoder work.
    smallest = encode_png(q.palette, q.indices, compress_level=9)
    assert len(smallest) <= BYTES_BEFORE[(name, k)]
    for png in (data, smallest):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), q.to_rgb())


def test_png_picks_the_smaller_of_4_and_8_bits() -> None:
    import zlib

    # Runs of odd length: at 4 bits a run boundary falls mid-byte every other time, so
    # deflate's byte matches break; at 8 bits the repeats stay byte-aligned.
    rng = np.random.default_rng(3)
    row = np.repeat(rng.integers(0, 16, 400), rng.integers(1, 8, 400) * 2 + 1)[:999]
    indices = np.stack([np.roll(row, 3 * y) for y in range(40)]).astype(np.uint8)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    data = encode_png(palette, indices, compress_level=9)
    sizes = {}
    for bits in (4, 8):
        from gpu_kquant.pngfile import _idat

        sizes[bits] = len(_idat(indices, bits, 9))
    idat = data.index(b"IDAT")
    assert int.from_bytes(data[idat - 4 : idat], "big") == min(sizes.values())
    assert data[24] == min(sizes, key=sizes.get)  # IHDR bit depth
    assert zlib.crc32(data[idat : idat + 4 + min(sizes.values())]) == int.from_bytes(
        data[idat + 4 + min(sizes.values()) : idat + 8 + min(sizes.values())], "big"
    )
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), palette[indices])


# Whole-file PNG bytes of `quantize(photo, k)` (CPU, default options) with the encoder before
# libdeflate (zlib level 6, filter None): the `current` column of
# benchmarks/results/png_bytes_amd-epyc_2c_nogpu_2026-12-02.csv. They also depend on the
# fitted palette: a change in k-means may move them.
BYTES_ZLIB6 = {
    ("astronaut", 16): 40048,
    ("chelsea", 16): 31433,
    ("coffee", 16): 46730,
    ("china", 16): 55229,
    ("china", 64): 95949,
    ("china", 256): 140936,
    ("flower", 16): 29348,
    ("flower", 64): 56600,
    ("flower", 256): 102410,
}


def _bundled(name: str) -> np.ndarray:
    path = Path(__file__).resolve().parents[1] / "gpu_kquant" / "samples" / f"{name}.png"
    return np.asarray(Image.open(path).convert("RGB")) if path.exists() else photo(name)


@pytest.mark.parametrize(("name", "k"), sorted(BYTES_ZLIB6))
def test_bundled_photo_pngs_are_not_larger_than_before_nor_than_pngquant(name: str, k: int, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from gpu_kquant import pngfile, quantize

    img = _bundled(name)
    q = quantize(img, k, device="cpu")
    data = encode_png(q.palette, q.indices)
    assert len(data) <= BYTES_ZLIB6[(name, k)]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), q.to_rgb())
    if shutil.which("pngquant") is None:
        pytest.skip("pngquant is not installed")
    if pngfile._libdeflate is None:
        pytest.skip("libdeflate (pip install deflate) is not installed: with zlib 6, flower at k=16 is 1.016x pngquant")
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    subprocess.run(
        ["pngquant", "--nofs", "--force", "--output", str(out), str(k), str(tmp_path / "in.png")], check=True
    )
    assert len(data) <= out.stat().st_size


def test_zlib_and_libdeflate_streams_decode_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_kquant import pngfile, quantize

    q = quantize(photo("coffee")[:80, :120], 16)
    with_libdeflate = encode_png(q.palette, q.indices)
    monkeypatch.setattr(pngfile, "_libdeflate", None)
    with_zlib = encode_png(q.palette, q.indices)
    for png in (with_libdeflate, with_zlib):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), q.to_rgb())
