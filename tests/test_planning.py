"""Planning: output names, collisions, outputs never on inputs, shards and the split between devices."""

from __future__ import annotations

from pathlib import Path

from common_utils import cli, photo
from PIL import Image

from gpu_kquant.options import EngineOptions, RunOptions
from gpu_kquant.planning import Task, plan_tasks, shard_of, split_tasks


def test_never_overwrites_an_input(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("coffee")[:40, :40]).save(src / "a.png")
    before = (src / "a.png").read_bytes()
    result = cli(src, "-k", 4, "-o", src, "--quiet", "--overwrite")
    assert result.returncode == 2 and f"the output folder {src} is the input folder {src}" in result.stderr
    # A file given directly, with its own folder as output and the same format.
    result = cli(src / "a.png", "-k", 4, "-o", src, "--quiet", "--overwrite")
    assert result.returncode == 1
    assert "output path is an input file" in (src / "gpu_kquant_report.jsonl").read_text()
    assert (src / "a.png").read_bytes() == before


def test_output_inside_input_tree_is_refused(tmp_path: Path) -> None:
    # Issue 12, item 2: -o at the user's own folder inside the input used to replace its images
    # with --overwrite (and leave them out without it).
    src = tmp_path / "in"
    (src / "quantized").mkdir(parents=True)
    Image.fromarray(photo("coffee")[:40, :40]).save(src / "a.png")
    Image.fromarray(photo("chelsea")[:40, :40]).save(src / "quantized" / "a.png")
    before = {p: p.read_bytes() for p in src.rglob("*.png")}
    result = cli(src, "-k", 4, "-o", src / "quantized", "--quiet", "--overwrite")
    assert result.returncode == 2
    assert f"the output folder {src / 'quantized'} is inside the input folder {src}" in result.stderr
    assert {p: p.read_bytes() for p in src.rglob("*.png")} == before  # nothing written there either
    assert sorted(p.name for p in src.rglob("*")) == ["a.png", "a.png", "quantized"]


def test_name_collisions_keep_both_outputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("coffee")[:40, :40]).save(src / "a.png")
    Image.fromarray(photo("chelsea")[:40, :40]).save(src / "a.jpg")
    assert cli(src, "-k", 4, "--quiet").returncode == 0
    assert sorted(p.name for p in (tmp_path / "in_k4").glob("*.png")) == ["a.jpg.png", "a.png.png"]


def test_shards_cover_every_input_exactly_once(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "s").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(src / ("s" if i % 2 else ".") / f"{i}.png")
    everything = {t.src for t in plan_tasks(RunOptions((src,)))[0]}
    parts = [{t.src for t in plan_tasks(RunOptions((src,), engine=EngineOptions(shard=(i, 3))))[0]} for i in range(3)]
    assert sum(len(p) for p in parts) == len(everything) == 20
    assert set().union(*parts) == everything
    assert all(shard_of(f"in/{i}.png", 3) == shard_of(f"in/{i}.png", 3) for i in range(5))
    # Through the command line, each shard writes its own report.
    for i in range(3):
        assert cli(src, "-k", 2, "--shard", f"{i}/3", "--quiet").returncode == 0
    outputs = sorted((tmp_path / "in_k2").rglob("*.png"))
    assert len(outputs) == 20
    reports = sorted((tmp_path / "in_k2").glob("gpu_kquant_report.shard-*-of-3.jsonl"))
    assert len(reports) == 3


def test_split_between_devices_is_the_shard_split(tmp_path: Path) -> None:
    tasks = [Task(Path(f"{i}.png"), Path(f"o{i}.png"), f"in/{i}.png") for i in range(40)]
    parts = split_tasks(tasks, 3)
    assert sorted(t.key for p in parts for t in p) == sorted(t.key for t in tasks)
    assert all(shard_of(t.key, 3) == i for i, p in enumerate(parts) for t in p)
    # Inside one shard of two, a split in two still balances.
    mine = [t for t in tasks if shard_of(t.key, 2) == 0]
    assert all(split_tasks(mine, 2, sharded=True))
