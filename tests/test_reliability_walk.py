"""Issue 12, walking and naming: every input gets one row, no output is shared, nothing outside OUT changes.

The command line runs in-process (``gpu_kquant.cli.main``) on tiny images, so each run
costs a fraction of a second.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gpu_kquant.cli import main
from gpu_kquant.naming import NAME_MAX, PATH_MAX, display_path, fold
from gpu_kquant.options import EngineOptions, OutputOptions, RunOptions
from gpu_kquant.planning import plan_job, plan_tasks

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".PNG": "PNG", ".webp": "WEBP"}


def image(path: Path | bytes, color: tuple[int, int, int] = (200, 30, 30)) -> None:
    """A 4x4 image in the format its extension names."""
    ext = os.path.splitext(os.fsdecode(path))[1]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        Image.new("RGB", (4, 4), color).save(f, _FORMATS.get(ext, "PNG"))


def run(*args: object) -> tuple[int, str]:
    """``gpu-kquant ARGS`` in-process: the exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args] + ["-k", "2", "--quiet"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def rows(report: Path) -> list[dict]:
    """The report's rows; the file must be valid UTF-8 JSON lines."""
    return [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Every file and link under ``root`` (but ``skip``): contents, or the link's target."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != os.fsencode(skip)]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):  # a link loop has no contents
                out[os.fsdecode(path)] = (
                    b"->" + os.readlink(path) if os.path.islink(path) else Path(os.fsdecode(path)).read_bytes()
                )
    return out


# item 1: names that collide never overwrite each other


@pytest.mark.parametrize(
    ("files", "inputs"),
    [
        (["d1/img.png", "d2/img.png"], ["d1/img.png", "d2/img.png"]),
        (["in/a.jpg", "in/a.jpg.png", "in/a.png"], ["in"]),
        (["p/x", "q/x", "x_2"], ["p/x", "q/x", "x_2"]),
        (["d1/Img.png", "d2/img.PNG"], ["d1/Img.png", "d2/img.PNG"]),  # one file on macOS and Windows
        (["in/e\u0301.png", "in/\u00e9.png"], ["in"]),  # NFD and NFC spellings of one name on macOS
    ],
)
def test_colliding_names_get_distinct_outputs(tmp_path: Path, files: list[str], inputs: list[str]) -> None:
    for i, name in enumerate(files):
        image(tmp_path / name, (40 * i, 90, 200 - 40 * i))
    out = tmp_path / "out"
    code, err = run(*[tmp_path / p for p in inputs], "-o", out)
    assert code == 0, err
    ok = [r for r in rows(out / "gpu_kquant_report.jsonl") if r["status"] == "ok"]
    assert sorted(r["input"] for r in ok) == sorted(str(tmp_path / p) for p in files)
    assert len({fold(r["output"]) for r in ok}) == len(files)  # distinct even ignoring case
    for r in ok:  # each output holds its own input's colours
        assert Path(r["output"]).stat().st_size == r["output_bytes"]
    # The same names whatever the shard.
    run_all = RunOptions(tuple(tmp_path / p for p in inputs), output=OutputOptions(out=out))
    names = {t.src: t.dst for t in plan_tasks(run_all)[0]}
    for i in range(3):
        sharded = RunOptions(run_all.inputs, output=run_all.output, engine=EngineOptions(shard=(i, 3)))
        assert all(names[t.src] == t.dst for t in plan_tasks(sharded)[0])


# items 2 and 14: outputs and the report never overlap an input; "." writes beside


def test_output_or_report_overlapping_an_input_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "in"
    image(src / "a.png")
    image(src / "old" / "b.png")
    image(tmp_path / "out" / "nested" / "c.png")
    before = snapshot(tmp_path)
    cases = [
        (["in", "-o", "in/old"], ("in/old", "in")),  # -o inside the input: its images were left out or destroyed
        (["in", "-o", "in"], ("in",)),
        (["out/nested", "-o", "out"], ("out/nested", "out")),  # the input inside -o
        (["in", "out/nested", "-o", "in/q"], ("in/q", "in")),
        (["in", "--report", "in/report.jsonl"], ("in/report.jsonl", "in")),
    ]
    for args, named in cases:
        code, err = run(*[tmp_path / a if not a.startswith("-") else a for a in args])
        message = err.strip().splitlines()[-1]
        assert code == 2, (args, err)
        assert all(str(tmp_path / p) in message for p in named), message
    assert snapshot(tmp_path) == before  # refused before anything was written
    code, err = run(tmp_path / "in", tmp_path / "out" / "nested", "-o", tmp_path / "x")
    assert code == 0, err


@pytest.mark.parametrize("given", [".", "./", "sub/..", "../in"])
def test_dot_input_writes_beside_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    src = tmp_path / "in"
    image(src / "a.png")
    (src / "sub").mkdir()
    monkeypatch.chdir(src)
    code, err = run(given)
    assert code == 0, err
    assert sorted(p.name for p in src.rglob("*")) == ["a.png", "sub"]  # nothing written inside the input
    assert [r["status"] for r in rows(tmp_path / "in_k2" / "gpu_kquant_report.jsonl")] == ["ok"]


def test_a_run_on_the_parent_leaves_earlier_outputs_out(tmp_path: Path) -> None:
    image(tmp_path / "photos" / "a.png")
    image(tmp_path / "photos" / "b.jpg")
    image(tmp_path / "photos_k4" / "a.png")
    image(tmp_path / "photos" / "c_k4.png")  # a file input's output, beside the originals
    manifests = {"photos_k4": ["a.png", "photos/ghost.png"], "photos": ["c_k4.png"]}
    for folder, paths in manifests.items():
        lines = [{"run": "r1", "options": "f"}] + [{"claim": p, "run": "r1"} for p in paths[1:]]
        lines += [{"path": paths[0], "size": 1, "mtime_ns": 1, "blake2b": "0", "options": "f", "run": "r1"}]
        (tmp_path / folder / "gpu_kquant_manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, err = run(tmp_path, "-o", tmp_path.parent / f"{tmp_path.name}-out")
    assert code == 0, err
    report = rows(tmp_path.parent / f"{tmp_path.name}-out" / "gpu_kquant_report.jsonl")
    assert sorted(Path(r["input"]).relative_to(tmp_path).as_posix() for r in report) == ["photos/a.png", "photos/b.jpg"]
    assert "2 images left out: outputs of an earlier run" in err
    # An output folder given on purpose (every image in it is an output) is quantized again.
    code, err = run(tmp_path / "photos_k4", "-o", tmp_path.parent / f"{tmp_path.name}-again")
    assert code == 0 and "left out" not in err, err


# items 5, 6, 7, 10: walking never crashes and never drops an input


_DEEP_NAME = "i" * 200 + ".png"


def _deep_folder(base: Path, size: int) -> tuple[int, bytes]:
    """Nested folders below ``base`` until the path passes ``size`` bytes; an image where its path passes PATH_MAX.

    Folder names are 200 bytes, the image's 204, so one folder that can still be listed
    holds an image whose path is too long, and the folders below cannot be listed.
    """
    fd = os.open(base, os.O_RDONLY)
    length, path = len(os.fsencode(base)), os.fsencode(base)
    try:
        while length < size:
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, length, path = inner, length + 201, path + b"/" + b"d" * 200
            if length + len(_DEEP_NAME) + 1 >= PATH_MAX:  # this image's path passes PATH_MAX
                img = os.open(_DEEP_NAME, os.O_WRONLY | os.O_CREAT, dir_fd=fd)
                with os.fdopen(img, "wb") as f:
                    Image.new("RGB", (4, 4)).save(f, "PNG")
    finally:
        os.close(fd)
    return length, path


def _last_rows(report: Path) -> dict[str, dict]:
    """The rows of the report's last run, by the name of their input."""
    data = rows(report)
    return {Path(r["input"]).name: r for r in data if r["run"] == data[-1]["run"]}


def test_non_utf8_names_are_kept_and_shown_escaped(tmp_path: Path) -> None:
    src = tmp_path / "in"
    image(src / "fine.png")
    image(os.fsencode(src) + b"/caf\xe9.png")  # Latin-1, not UTF-8
    for status in ("ok", "skipped"):  # the rerun (resume) crashed
        code, err = run(src, "-o", tmp_path / "out")
        assert code == 0, err
        last = _last_rows(tmp_path / "out" / "gpu_kquant_report.jsonl")
        assert {name: r["status"] for name, r in last.items()} == {"fine.png": status, "caf\\xe9.png": status}
        assert f"gpu_kquant: {2 * (status == 'ok')} ok, {2 * (status == 'skipped')} skipped" in err
    assert os.path.exists(os.fsencode(tmp_path) + b"/out/caf\xe9.png")  # the output keeps the input's bytes


def test_symlink_loop_is_a_failed_row(tmp_path: Path) -> None:
    src = tmp_path / "in"
    image(src / "fine.png")
    (src / "b.png").symlink_to("c.png")
    (src / "c.png").symlink_to("b.png")
    code, err = run(src, "-o", tmp_path / "out")
    assert code == 1, err
    last = _last_rows(tmp_path / "out" / "gpu_kquant_report.jsonl")
    assert last["fine.png"]["status"] == "ok"
    assert all("symbolic link loop" in last[n]["reason"] for n in ("b.png", "c.png"))


def test_name_too_long_for_the_file_system_is_a_failed_row(tmp_path: Path) -> None:
    src = tmp_path / "in"
    long_stem = "L" * (NAME_MAX - 4)
    image(src / f"{long_stem}.jpg")  # fits; with the collision rule's extension its output does not
    image(src / f"{long_stem}.png")
    image(src / "fine.png")
    code, err = run(src, "-o", tmp_path / "out")
    assert code == 1, err
    last = _last_rows(tmp_path / "out" / "gpu_kquant_report.jsonl")
    assert last["fine.png"]["status"] == "ok"
    for ext in (".jpg", ".png"):
        assert last[long_stem + ext]["status"] == "failed"
        assert f"would be {NAME_MAX + 4} bytes; the file system allows {NAME_MAX}" in last[long_stem + ext]["reason"]
    # A file given directly: STEM_k2.png passes the limit.
    code, err = run(src / f"{long_stem}.jpg")
    assert code == 1 and "1 failed" in err, err


def test_walk_errors_are_failed_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    image(src / "fine.png")
    image(src / "locked" / "x.png")
    _deep_folder(src, PATH_MAX + 300)
    locked = os.fsencode(src / "locked")
    if os.geteuid() != 0:
        os.chmod(locked, 0)
    else:  # root reads every folder: make the kernel's refusal happen where os.walk lists this one
        real_scandir = os.scandir

        def scandir(path: object = ".") -> object:
            if os.fsencode(path) == locked:  # type: ignore[arg-type]
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_scandir(path)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        code, err = run(src, "-o", tmp_path / "out")
    finally:
        os.chmod(locked, 0o755)
    assert code == 1, err
    last = _last_rows(tmp_path / "out" / "gpu_kquant_report.jsonl")
    assert last["fine.png"]["status"] == "ok"
    assert "cannot read folder: Permission denied" in last["locked"]["reason"]
    assert "the input path is" in last[_DEEP_NAME]["reason"]  # its folder is listed, its own path is too long
    assert "cannot read folder: File name too long" in last["d" * 200]["reason"]  # the folder below it


# item 9: output locations that cannot be used are usage errors, before any work


def test_unusable_output_folder_is_a_usage_error(tmp_path: Path) -> None:
    image(tmp_path / "in" / "a.png")
    (tmp_path / "afile").write_text("mine")
    report = tmp_path / "r.jsonl"
    code, err = run(tmp_path / "in", "-o", tmp_path / "afile", "--report", report)
    assert code == 2 and f"the output folder {tmp_path / 'afile'} is a file" in err.strip().splitlines()[-1]
    assert (tmp_path / "afile").read_text() == "mine" and not report.exists()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    candidates = [readonly, Path("/proc/sys")]
    target = next((c for c in candidates if not os.access(c, os.W_OK)), None)
    if target is None:
        pytest.skip("no read-only folder here (root ignores permissions, no read-only mount)")
    code, err = run(tmp_path / "in", "-o", target / "q", "--report", report)
    assert code == 2 and "cannot write in the output folder" in err.strip().splitlines()[-1], err
    assert not report.exists()


def test_plan_job_checks_before_walking(tmp_path: Path) -> None:
    image(tmp_path / "in" / "a.png")
    with pytest.raises(ValueError, match="inside the input folder"):
        plan_job(RunOptions((tmp_path / "in",), output=OutputOptions(out=tmp_path / "in" / "o")))


# the property: random trees of names


_NAMES = st.sampled_from(["a", "A", "x", "x_2", "img", "a.jpg", "e\u0301", "\u00e9", "caf\udce9", "b"])
_EXTS = st.sampled_from([".png", ".jpg", ".PNG", ".webp"])
_DIRS = st.lists(st.sampled_from(["d1", "D1", "d2", "s"]), max_size=2)
_ENTRY = st.tuples(_DIRS, _NAMES, _EXTS, st.sampled_from(["image", "image", "image", "link", "loop", "broken"]))


def _build(root: Path, entries: list[tuple[list[str], str, str, str]]) -> list[Path]:
    """Make the tree; returns the image-named files made (links included), in no order."""
    made: list[Path] = []
    for i, (dirs, name, ext, kind) in enumerate(entries):
        folder = root.joinpath(*dirs)
        path = folder / f"{name}{ext}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path):
                continue
            if kind == "image" or (kind == "link" and not made):
                image(path, (i * 20 % 256, 100, 50))
            elif kind == "link":
                path.symlink_to(made[i % len(made)])
            elif kind == "loop":
                other = folder / f"{name}-loop{ext}"
                if os.path.lexists(other):
                    continue
                path.symlink_to(other.name)
                other.symlink_to(path.name)
                made.append(other)
            else:
                path.symlink_to(folder / "nowhere.png")
        except (FileExistsError, NotADirectoryError):
            continue
        made.append(path)
    return made


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(_ENTRY, min_size=1, max_size=8), how=st.sampled_from(["tree", "top", "default"]))
def test_property_every_input_one_row_no_shared_output(
    entries: list[tuple[list[str], str, str, str]], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "in"
        root.mkdir()
        made = _build(root, entries)
        out = base / ("in_k2" if how == "default" else "out")
        if how == "top":  # the top-level entries one by one: files and folders mixed (a dead link is no input)
            inputs = sorted(p for p in root.iterdir() if p.exists())
            expected = [p for p in made if p.parent == root and p.exists()] + [
                p for p in made if p.parent != root and p.relative_to(root).parts[0] in {q.name for q in inputs}
            ]
        else:
            inputs, expected = [root], made
        if not inputs:
            return
        before = snapshot(base, skip=out)
        code, err = run(*inputs, *([] if how == "default" else ["-o", out]))
        assert code in (0, 1), err
        report = rows(out / "gpu_kquant_report.jsonl")
        assert Counter(r["input"] for r in report) == Counter(display_path(p) for p in expected)
        ok = [r["output"] for r in report if r["status"] == "ok"]
        assert len({fold(o) for o in ok}) == len(ok)
        assert all(Path(o).exists() for o in ok if "\\x" not in o)
        assert snapshot(base, skip=out) == before
