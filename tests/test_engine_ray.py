"""The Ray Data engine: same outputs and report as the local engine, worker deaths, resources, CLI.

One local Ray (2 CPUs, no GPU) is started for the whole module and images are small: about
two minutes on a 2-core machine, most of it starting Ray and its worker processes (each one
imports PyTorch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from common_utils import cli, needs_cuda, photo  # noqa: E402
from PIL import Image  # noqa: E402

import gpu_kquant.engine_ray as gray  # noqa: E402
import gpu_kquant.ray_session as rsession  # noqa: E402
from gpu_kquant.engine_local import run_local  # noqa: E402
from gpu_kquant.engine_ray import WorkerActor, resources, run_on_ray  # noqa: E402
from gpu_kquant.imagefiles import TEMP_PREFIX  # noqa: E402
from gpu_kquant.manifest import MANIFEST  # noqa: E402
from gpu_kquant.options import EngineOptions, FitOptions, OutputOptions, RunOptions  # noqa: E402
from gpu_kquant.planning import plan_job  # noqa: E402
from gpu_kquant.quantize import Quantized  # noqa: E402
from gpu_kquant.report import Row, Summary  # noqa: E402
from gpu_kquant.worker import Item, Worker  # noqa: E402

REPORT = "gpu_kquant_report.jsonl"
BAD = {"empty.png", "corrupt.jpg", "truncated.png", "text.png"}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A local Ray for this module; yields its address for other drivers."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def make_tree(root: Path, n: int = 46, bad: bool = True) -> Path:
    """``n`` small images of every common kind in nested folders, plus bad files when ``bad``."""
    names = ("chelsea", "coffee", "astronaut")
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photo(names[i % 3])
        h, w = int(rng.integers(64, 161)), int(rng.integers(64, 201))
        y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        pil = Image.fromarray(img[y : y + h, x : x + w])
        folder = root / ("a" if i % 2 else "b/c" if i % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 7 == 0:
            pil.save(folder / f"img{i:02d}.jpg", quality=90)
        elif i % 7 == 1:
            rgba = pil.convert("RGBA")
            alpha = np.full((h, w), 255, np.uint8)
            alpha[:, : w // 3] = 0
            rgba.putalpha(Image.fromarray(alpha))
            rgba.save(folder / f"img{i:02d}.png")
        elif i % 7 == 2:
            pil.convert("L").save(folder / f"img{i:02d}.png")
        else:
            pil.save(folder / f"img{i:02d}.png")
    if bad:
        (root / "empty.png").write_bytes(b"")
        (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
        data = next(root.rglob("img*.png")).read_bytes()
        (root / "b" / "truncated.png").write_bytes(data[: len(data) // 2])
        (root / "a" / "text.png").write_text("not an image\n")
        (root / "a" / "notes.txt").write_text("ignored: not an image extension\n")
    return root


def outputs(root: Path) -> dict[str, str]:
    """SHA-256 of every output under ``root`` by relative path (no report, no temporary files)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (REPORT, MANIFEST) and not p.name.startswith(TEMP_PREFIX)
    }


def assert_same_outputs(out: Path, local: Path) -> None:
    """Byte-identical outputs at the same relative paths as the local engine's."""
    mine, theirs = outputs(out), outputs(local)
    assert set(mine) == set(theirs)
    differ = sorted(rel for rel in mine if mine[rel] != theirs[rel])
    assert not differ, (
        f"outputs differ from the local engine's: {differ}. The engines batch images differently, so this "
        "means an image's result depends on the other images in its k-means batch (it must not: "
        "see quantize_batch's docstring)"
    )


def rows(out: Path, tree: Path) -> dict[str, dict]:
    """Report rows keyed by input path relative to ``tree``, without timings, outputs made relative."""
    result = {}
    for line in (out / REPORT).read_text().splitlines():
        row = json.loads(line)
        row.pop("seconds")
        row.pop("run")  # each run has its own id
        row["output"] = Path(row["output"]).relative_to(out).as_posix()
        result[Path(row["input"]).relative_to(tree).as_posix()] = row
    return result


def options(tree: Path, out: Path | None = None, k: int = 8, **engine: Any) -> RunOptions:
    """A run over ``tree`` into ``out`` at ``k`` colours; ``engine`` fields as keywords."""
    return RunOptions((tree,), FitOptions(k=k), OutputOptions(out=out), EngineOptions(**engine))


def with_palette(run: RunOptions, palette: str) -> RunOptions:
    return dataclasses.replace(run, output=dataclasses.replace(run.output, palette=palette))


def ray_run(run: RunOptions, **kwargs: Any) -> Summary:
    return run_on_ray(plan_job(run), run, **kwargs)


def local_run(run: RunOptions) -> Summary:
    return run_local(plan_job(run), run)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("ray") / "photos")


@pytest.fixture(scope="module")
def local(tree: Path) -> Path:
    """The local engine's outputs for ``tree`` (k=8)."""
    out = tree.parent / "local"
    summary = local_run(options(tree, out))
    assert summary.counts["ok"] == 46 and summary.counts["failed"] == len(BAD)
    return out


def test_same_outputs_and_report_as_local(ray_cluster: str, tree: Path, local: Path) -> None:
    out = tree.parent / "ray"
    seen = []
    summary = ray_run(options(tree, out), progress=lambda n, px: seen.append((n, px)))
    assert_same_outputs(out, local)
    assert len(outputs(out)) == 46
    assert rows(out, tree) == rows(local, tree)
    failed = {Path(k).name: r["reason"] for k, r in rows(out, tree).items() if r["status"] == "failed"}
    assert set(failed) == BAD, failed
    assert summary.counts == {"ok": 46, "failed": len(BAD)} and summary.ignored == 1
    assert not summary.interrupted and summary.seconds > 0
    assert len(seen) == 46 + len(BAD) and sum(n for n, _ in seen) == 46 + len(BAD)
    ok_pixels = sum(r["width"] * r["height"] for r in rows(out, tree).values() if r["status"] == "ok")
    assert sum(px for _, px in seen) == ok_pixels


def test_resume_redoes_what_the_manifest_does_not_vouch_for(
    ray_cluster: str, tree: Path, local: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tree.parent / "resume"
    config = options(tree, out)
    written = list(outputs(local))
    out.mkdir()
    shutil.copy(local / MANIFEST, out / MANIFEST)  # paths in the manifest are relative to the folder
    for rel in written[:-3]:  # a run killed after most outputs were written
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes((local / rel).read_bytes())
    (out / written[0]).write_bytes(b"")  # and one output left empty (a full disk, say)
    summary = ray_run(config)
    assert summary.counts == {"skipped": 42, "ok": 4, "failed": len(BAD)}
    assert_same_outputs(out, local)
    redone = {r["output"] for r in rows(out, tree).values() if r["status"] == "ok"}
    assert redone == {written[0], *written[-3:]}

    def no_ray(*args: object) -> None:
        raise AssertionError("Ray was used with nothing to do")

    # Files gpu_kquant did not write are never replaced, and give failed rows without starting Ray.
    monkeypatch.setattr(gray, "_process_on_ray", no_ray)
    good = make_tree(tree.parent / "good", n=3, bad=False)
    good_out = tree.parent / "good_out"
    config = dataclasses.replace(options(good, good_out), output=OutputOptions(out=good_out, overwrite=True))
    for rel in ("img00.jpg", "a/img01.png", "b/c/img02.png"):
        dst = (good_out / rel).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"the user's own file")
    assert ray_run(config).counts == {"failed": 3}
    assert all(p.read_bytes() == b"the user's own file" for p in good_out.rglob("*.png"))
    assert all("not written by gpu_kquant" in r["reason"] for r in rows(good_out, good).values())
    # A finished job resumes without Ray.
    local_run(options(good, tree.parent / "good_done"))
    assert ray_run(options(good, tree.parent / "good_done")).counts == {"skipped": 3}


def test_shared_palette_same_as_local(ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = make_tree(tmp_path / "small", n=8, bad=False)
    # A name that is not UTF-8 goes through Ray Data as bytes (pyarrow cannot encode it as a string):
    # both the histogram pass and the mapping pass see it (issue 12, item 5). Ray 2.60 falls back to
    # pickled objects for such a column where older Rays raise; the test turns the fallback off.
    context = ray.data.DataContext.get_current()
    if hasattr(context, "enable_fallback_to_arrow_object_ext_type"):
        monkeypatch.setattr(context, "enable_fallback_to_arrow_object_ext_type", False)
    odd = os.fsdecode(b"caf\xe9.png")
    (small / "a" / "img03.png").rename(small / "a" / odd)
    configs = {name: with_palette(options(small, tmp_path / name), "shared") for name in ("local", "ray")}
    local_run(configs["local"])
    summary = ray_run(configs["ray"])
    assert summary.counts == {"ok": 8}
    assert (tmp_path / "ray" / "palette.json").exists()
    assert (tmp_path / "ray" / "a" / odd).is_file()
    assert_same_outputs(tmp_path / "ray", tmp_path / "local")


def test_shared_histogram_is_a_ray_reduce_equal_to_the_local_one(ray_cluster: str, tmp_path: Path) -> None:
    import torch

    from gpu_kquant.engine_local import shared_histogram
    from gpu_kquant.planning import plan_tasks
    from gpu_kquant.ray import ray_histogram

    tree = make_tree(tmp_path / "tree", n=12)  # RGB, RGBA, grey and bad files
    config = options(tree)
    tasks = plan_tasks(config)[0]
    local = shared_histogram(tasks, config, torch.device("cpu"))
    remote = ray_histogram(tasks, config, torch.device("cpu"))
    a, b = local.color_set(), remote.color_set()
    assert a.channels == b.channels == 4
    assert torch.equal(a.keys, b.keys) and torch.equal(a.counts, b.counts)
    assert local.images == remote.images == 12


@needs_cuda
def test_gpu_actors_same_as_local(ray_cluster: str, tree: Path, tmp_path: Path) -> None:
    assert ray.cluster_resources().get("GPU", 0) >= 1
    configs = {name: options(tree, tmp_path / name, device="cuda") for name in ("local", "ray")}
    local_run(configs["local"])
    summary = ray_run(configs["ray"])
    assert summary.counts == {"ok": 46, "failed": len(BAD)}
    assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    assert rows(tmp_path / "ray", tree) == rows(tmp_path / "local", tree)


def crashing(marker: Path, victim: str, always: bool = False) -> type[WorkerActor]:
    """A quantize actor whose process dies (``os._exit``) at ``victim``: once, or every time.

    Before dying it leaves a half-written temporary file, as a write cut short would.
    """

    class CrashingWorker(Worker):
        def write(self, item: Item, result: Quantized | Exception) -> Row:
            if item.task.src.name == victim and (always or not marker.exists()):
                marker.write_text(str(os.getpid()))
                item.task.dst.parent.mkdir(parents=True, exist_ok=True)
                (item.task.dst.parent / f"{TEMP_PREFIX}crash.tmp").write_bytes(b"\x89PNG partial")
                os._exit(1)
            return super().write(item, result)

    class Crashing(WorkerActor):
        worker_class = CrashingWorker

    return Crashing


def assert_complete(out: Path, expected: set[str]) -> None:
    assert set(outputs(out)) == expected
    for rel in expected:
        with Image.open(out / rel) as img:
            img.load()  # raises on a truncated file


def test_killed_worker_is_retried_and_outputs_are_complete(ray_cluster: str, tree: Path, local: Path) -> None:
    out = tree.parent / "crash"
    marker = tree.parent / "crashed-once"
    summary = ray_run(options(tree, out, ray_workers=1), actor=crashing(marker, "img10.png"))
    assert marker.exists(), "the actor never crashed"
    assert summary.counts == {"ok": 46, "failed": len(BAD)}
    assert_complete(out, set(outputs(local)))
    assert_same_outputs(out, local)


@pytest.mark.timeout(480)
def test_input_that_always_kills_its_worker_fails_alone(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hung for 7+ minutes with torch 2.14 (CUDA build) and ray 2.60 while actors restarted without
    bound and the driver waited on Ray without a timeout: now restarts are bounded, and a stall
    gives failed rows (and this test a clean failure) instead of a hang."""
    monkeypatch.setattr(gray, "RETRIES", 0)  # keep it short: one attempt per pass
    monkeypatch.setattr(rsession, "STALL_SECONDS", 200.0)  # a stall fails this test before its timeout
    small = make_tree(tmp_path / "small", n=8, bad=False)
    out = tmp_path / "out"
    victim = "img05.png"
    actor = crashing(tmp_path / "marker", victim, always=True)
    summary = ray_run(options(small, out, ray_workers=1), actor=actor)
    assert summary.counts == {"ok": 7, "failed": 1}
    report = rows(out, small)
    lost = [r for r in report.values() if r["status"] == "failed"]
    assert len(lost) == 1 and Path(lost[0]["input"]).name == victim and lost[0]["reason"].startswith("lost:")
    assert_complete(out, {r["output"] for r in report.values() if r["status"] == "ok"})


@pytest.mark.parametrize("parallel_groups", [True, False], ids=["cpu-threads", "gpu-style"])
def test_stages_in_process(tmp_path: Path, parallel_groups: bool) -> None:
    """The worker actor called directly (no Ray): the same rows and bytes as the local engine.

    ``gpu-style`` runs the GPU actor's path (groups one after another on one quantizer
    thread, writes in threads) on the CPU.
    """
    import torch

    from gpu_kquant.engine_local import shared_histogram
    from gpu_kquant.runsetup import setup_run

    small = make_tree(tmp_path / "small", n=7)
    local_run(options(small, tmp_path / "local", batch_size=2))
    config = options(small, tmp_path / "direct", batch_size=2)
    job = plan_job(config)
    tasks = job.tasks
    batch = {
        "i": np.arange(len(tasks)),
        "src": np.asarray([str(t.src) for t in tasks], dtype=object),
        "dst": np.asarray([str(t.dst) for t in tasks], dtype=object),
        "key": np.asarray([t.key for t in tasks], dtype=object),
    }
    setup = setup_run(job, config, torch.device("cpu"), shared_histogram)
    threads = torch.get_num_threads()
    try:
        actor = WorkerActor(setup, "cpu", threads=2, sub_batch=2)  # makes this process single-threaded
    finally:
        torch.set_num_threads(threads)
    if not parallel_groups:
        actor.worker = Worker(setup, "cpu", io_threads=2, quantizers=1, group_size=2)
    result = actor(batch)
    assert list(result["i"]) == list(range(len(tasks)))
    assert (result["decode_s"] >= 0).all() and (result["encode_s"] >= 0).all()
    (tmp_path / "direct" / REPORT).write_text("".join(gray.row_from_json(r).to_json() + "\n" for r in result["row"]))
    assert rows(tmp_path / "direct", small) == rows(tmp_path / "local", small)
    assert_same_outputs(tmp_path / "direct", tmp_path / "local")


def test_resources_one_actor_per_gpu() -> None:
    four = resources(4, cpus=32)
    assert (four.num_gpus, four.concurrency, four.device) == (1, 4, "cuda")
    assert four.num_cpus == 1 and four.batch_size == four.sub_batch == 256  # a GPU batch closes at batch_pixels
    assert resources(4, cpus=32, workers=2).concurrency == 2  # capped by --workers...
    assert resources(4, cpus=32, workers=9).concurrency == 4  # ...and by the GPUs
    assert resources(8, cpus=8).num_cpus < 1  # eight actors leave CPUs to decode
    assert resources(1, cpus=16, batch_size=32).batch_size == 32
    assert resources(4, cpus=32, device="cuda:1").num_gpus == 1


def test_resources_without_gpus() -> None:
    one = resources(0, cpus=2)
    assert (one.num_gpus, one.concurrency, one.device, one.threads) == (0, 1, "cpu", 2)
    assert one.num_cpus == 1 and one.sub_batch == 4 and one.batch_size == 16
    two = resources(0, cpus=2, workers=2)
    assert (two.concurrency, two.threads, two.num_cpus) == (2, 1, 0.5)  # one CPU stays free to decode
    assert resources(0, cpus=1).num_cpus == 0
    assert resources(4, cpus=32, device="cpu").num_gpus == 0  # --device cpu on a GPU cluster
    with pytest.raises(ValueError, match="no GPU"):
        resources(0, cpus=8, device="cuda")


def test_cli(ray_cluster: str, tmp_path: Path) -> None:
    small = make_tree(tmp_path / "pics", n=6, bad=False)
    out = tmp_path / "pics_k8"
    done = cli(small, "-k", "8", "--engine", "ray", "--ray-address", ray_cluster, "--quiet", drop_env=("RAY_ADDRESS",))
    assert done.returncode == 0, done.stderr
    assert "6 ok" in done.stderr
    expected = {p.relative_to(small).with_suffix(".png").as_posix() for p in small.rglob("img*")}
    assert_complete(out, expected)

    @ray.remote
    def alive() -> int:
        return 1

    assert ray.get(alive.remote()) == 1  # joining the cluster did not shut it down
    first = sorted(expected)[0]
    (out / first).unlink()
    done = cli(small, "-k", "8", "--engine", "ray", drop_env=("RAY_ADDRESS",))  # starts (and stops) its own local Ray
    assert done.returncode == 0, done.stderr
    assert "1 ok, 5 skipped" in done.stderr
    assert_complete(out, expected)
    assert ray.get(alive.remote()) == 1


def test_waits_on_ray_are_bounded() -> None:
    """The row iterator gives up on a batch that never comes, and hands on errors and the end."""
    import threading
    import time

    release = threading.Event()

    def stuck() -> Iterator[int]:
        yield 1
        release.wait(60)  # a Ray iterator waiting on a worker that never answers
        yield 2

    t0 = time.monotonic()
    seen = []
    with pytest.raises(rsession.Stalled):
        for item in rsession.batches_within(stuck(), 1.0):
            seen.append(item)
    assert seen == [1] and time.monotonic() - t0 < 30
    release.set()
    assert list(rsession.batches_within(iter(range(5)), 5.0)) == [0, 1, 2, 3, 4]

    def failing() -> Iterator[int]:
        yield 1
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        list(rsession.batches_within(failing(), 5.0))


def hanging(seconds: float) -> type[WorkerActor]:
    """A worker actor that hangs once (for ``seconds``), like a worker stuck in a driver call."""

    class HangingWorker(Worker):
        slept = False

        def write(self, item: Item, result: Quantized | Exception) -> Row:
            import time

            if not HangingWorker.slept:
                HangingWorker.slept = True
                time.sleep(seconds)
            return super().write(item, result)

    class Hanging(WorkerActor):
        worker_class = HangingWorker

    return Hanging


@pytest.mark.timeout(480)
def test_a_stalled_job_ends_with_failed_rows_instead_of_hanging(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Last in the module: its stuck actor holds a CPU of the shared local Ray until its sleep ends."""
    import time

    monkeypatch.setattr(rsession, "STALL_SECONDS", 45.0)
    small = make_tree(tmp_path / "small", n=4, bad=False)
    t0 = time.monotonic()
    summary = ray_run(options(small, tmp_path / "out", ray_workers=1), actor=hanging(75))
    assert time.monotonic() - t0 < 300
    assert summary.counts == {"failed": 4}
    reasons = {r["reason"] for r in rows(tmp_path / "out", small).values()}
    assert reasons == {gray._STALLED.format(s=45.0)}
    # Once the actor wakes up, the abandoned dataset is closed and its executor stops (not at shutdown).
    import threading

    for thread in threading.enumerate():
        if thread.name == "gpu_kquant-ray-rows":
            thread.join(240)
            assert not thread.is_alive()


def test_an_actor_splits_its_batch_to_fit_the_memory_budget(tmp_path: Path) -> None:
    """Per actor, decoded bytes stay within --memory-budget: a batch is processed in parts (issue 12, item 16)."""
    import torch

    from gpu_kquant.engine_local import shared_histogram
    from gpu_kquant.imagefiles import estimated_decoded_bytes
    from gpu_kquant.runsetup import setup_run

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (1000, 800), (40 * i, 90, 0)).save(src / f"{i}.png")
    each = estimated_decoded_bytes(src / "0.png")
    engine = EngineOptions(memory_budget=int(2.5 * each))
    config = RunOptions((src,), FitOptions(k=4), OutputOptions(out=tmp_path / "out"), engine)
    job = plan_job(config)
    setup = setup_run(job, config, torch.device("cpu"), shared_histogram)
    calls: list[int] = []

    class CountingWorker(Worker):
        def process(self, tasks: list[Any], on_row: Any = None) -> list[Row]:
            calls.append(len(tasks))
            return super().process(tasks, on_row)

    class CountingActor(WorkerActor):
        worker_class = CountingWorker

    threads = torch.get_num_threads()
    try:
        actor = CountingActor(setup, "cpu", threads=2, sub_batch=2)
    finally:
        torch.set_num_threads(threads)
    batch = {
        "i": np.arange(len(job.tasks)),
        "src": np.asarray([str(t.src) for t in job.tasks], dtype=object),
        "dst": np.asarray([str(t.dst) for t in job.tasks], dtype=object),
        "key": np.asarray([t.key for t in job.tasks], dtype=object),
    }
    result = actor(batch)
    assert calls == [2, 2, 1]
    assert [gray.row_from_json(r).status for r in result["row"]] == ["ok"] * 5
