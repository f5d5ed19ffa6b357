"""What a run decides once: the shared palette, fitted, saved, reused and re-applied."""

from __future__ import annotations

from pathlib import Path

from common_utils import cli, plte, small_folder


def test_shared_palette(tmp_path: Path) -> None:
    src = small_folder(tmp_path)
    out = tmp_path / "out"
    result = cli(src, "-k", 16, "-o", out, "--palette", "shared", "--quiet")
    assert result.returncode == 0, result.stderr
    outputs = sorted(out.glob("*.png"))
    assert len(outputs) == 3
    assert len({plte(p) for p in outputs}) == 1  # byte-identical palettes
    for name in ("palette.json", "palette.npy", "palette.gpl"):
        assert (out / name).exists()
    # A saved palette re-applied gives identical outputs.
    again = tmp_path / "again"
    assert cli(src, "-o", again, "--palette", out / "palette.json", "--quiet").returncode == 0
    for path in outputs:
        assert (again / path.name).read_bytes() == path.read_bytes()
    # A resumed run reuses the saved palette instead of fitting a new one.
    stamp = (out / "palette.json").stat().st_mtime_ns
    (outputs[0]).unlink()
    assert cli(src, "-k", 16, "-o", out, "--palette", "shared", "--quiet").returncode == 0
    assert (out / "palette.json").stat().st_mtime_ns == stamp
    assert outputs[0].read_bytes() == (again / outputs[0].name).read_bytes()


def test_shared_palette_never_replaces_a_users_file(tmp_path: Path) -> None:
    # palette.json/.npy/.gpl beside the outputs are gpu_kquant's only when its manifest lists them (issue 12)
    src = small_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mine = b'{"colors": "the user\'s own notes"}'
    (out / "palette.json").write_bytes(mine)
    for extra in ((), ("--overwrite",)):
        result = cli(src, "-k", 8, "-o", out, "--palette", "shared", "--quiet", *extra)
        assert result.returncode == 2, result.stderr
        assert "palette.json exists and was not written by gpu_kquant" in result.stderr.strip().splitlines()[-1]
        assert (out / "palette.json").read_bytes() == mine
    assert not list(out.glob("*.png"))
    # Files gpu_kquant wrote are listed, so --overwrite refits and replaces them.
    (out / "palette.json").unlink()
    assert cli(src, "-k", 8, "-o", out, "--palette", "shared", "--quiet").returncode == 0
    (out / "palette.gpl").touch()  # changed since written: still ours, replaced
    result = cli(src, "-k", 8, "-o", out, "--palette", "shared", "--overwrite", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "palette.gpl").read_text().startswith("GIMP Palette")


def test_a_rerun_with_other_fit_options_refits_the_shared_palette(tmp_path: Path) -> None:
    """A saved palette is reused only when fitted with these options: -k 8 then -k 16 gives 16 colours."""
    import json

    src = small_folder(tmp_path)
    out = tmp_path / "out"
    assert cli(src, "-k", 8, "-o", out, "--palette", "shared", "--quiet").returncode == 0
    result = cli(src, "-k", 16, "-o", out, "--palette", "shared", "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((out / "palette.json").read_text())["colors"]) == 16
    assert "3 ok" in result.stderr  # the outputs were redone with the new palette
    assert {(len(plte(p)) - 8) // 3 for p in out.glob("*.png")} == {16}  # length and type, then RGB
