"""Pinned staging and copy-stream uploads: a pass-through on the CPU, and never a change to any output."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from common_utils import digest, needs_cuda, photo
from PIL import Image

from gpu_kquant import quantize_batch
from gpu_kquant.options import FitOptions, OutputOptions
from gpu_kquant.planning import Task
from gpu_kquant.quantize import to_tensor
from gpu_kquant.report import Row
from gpu_kquant.runsetup import RunSetup
from gpu_kquant.staging import Stager, host_view
from gpu_kquant.worker import Worker
from gpu_kquant.writing import Item


def decoded_like(array: np.ndarray) -> np.ndarray:
    """``array`` as the decoder returns pixels: read-only, its memory owned by a bytes object."""
    out = np.asarray(Image.fromarray(array))
    assert not out.flags.writeable
    return out


def rgba_with_alpha() -> np.ndarray:
    """(40, 56, 4) uint8 with a transparent corner and a translucent band."""
    rgba = np.concatenate([photo("coffee")[:40, :56], np.full((40, 56, 1), 255, np.uint8)], axis=2)
    rgba[:10, :10, 3] = 0
    rgba[20:25, :, 3] = 128
    return rgba


class CountingAlloc:
    """A CPU stand-in for the pinned allocator: records the shapes asked for."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        self.shapes.append(shape)
        return torch.empty(shape, dtype=torch.uint8)


def test_on_the_cpu_stage_is_a_view_of_the_decoded_array_without_a_warning() -> None:
    pixels = decoded_like(photo("chelsea")[:30, :40])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy would warn about the read-only array
        staged = Stager("cpu").stage(pixels)
    assert staged.data_ptr() == pixels.ctypes.data and tuple(staged.shape) == pixels.shape
    assert np.array_equal(staged.numpy(), pixels)
    writeable = np.array(pixels)
    assert host_view(writeable).data_ptr() == writeable.ctypes.data


def test_on_the_cpu_upload_passes_the_tensors_through() -> None:
    images = [host_view(decoded_like(photo("coffee")[:20, :30])), torch.zeros(4, 5, 4, dtype=torch.uint8)]
    stager = Stager("cpu")
    uploaded = stager.upload(images)
    assert stager.copy_stream is None and uploaded.event is None
    taken = uploaded.take()
    assert len(taken) == 2 and all(a is b for a, b in zip(taken, images))


def test_an_injected_allocator_gets_each_image_s_shape_and_holds_a_copy() -> None:
    alloc = CountingAlloc()
    stager = Stager("cpu", alloc=alloc)
    rgb, rgba = decoded_like(photo("astronaut")[:24, :32]), rgba_with_alpha()
    staged = [stager.stage(rgb), stager.stage(rgba)]
    assert alloc.shapes == [(24, 32, 3), (40, 56, 4)]
    for t, src in zip(staged, (rgb, rgba)):
        assert t.dtype == torch.uint8 and t.is_contiguous() and np.array_equal(t.numpy(), src)
        assert not np.shares_memory(t.numpy(), src)


def test_when_no_buffer_can_be_had_stage_falls_back_to_a_view() -> None:
    def exhausted(shape: tuple[int, ...]) -> torch.Tensor:
        raise RuntimeError("CUDA error: out of memory")

    pixels = decoded_like(photo("coffee")[:8, :8])
    assert Stager("cpu", alloc=exhausted).stage(pixels).data_ptr() == pixels.ctypes.data


def test_stage_refuses_anything_but_hwc_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Stager("cpu").stage(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        Stager("cpu").stage(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("dither", ["none", "fs", "ordered"])
def test_quantizing_staged_views_never_writes_the_decoded_pixels(dither: str) -> None:
    """The CPU pass-through shares the decoder's memory, so nothing may write to an input image."""
    arrays = [decoded_like(photo("chelsea")[:32, :48]), rgba_with_alpha()]
    before = [a.copy() for a in arrays]
    views = [Stager("cpu").stage(a) for a in arrays]
    quantize_batch(views, 8, dither=dither, device="cpu")
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))


def write_inputs(src: Path) -> list[Task]:
    """Six inputs in ``src``: RGB photos, an RGBA one with transparency, an opaque RGBA and a bad file."""
    src.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.roll(photo("chelsea")[:48, :64], 9 * i, axis=1)).save(src / f"rgb{i}.png")
    Image.fromarray(rgba_with_alpha(), "RGBA").save(src / "alpha.png")
    opaque = np.concatenate([photo("astronaut")[:40, :40], np.full((40, 40, 1), 255, np.uint8)], axis=2)
    Image.fromarray(opaque, "RGBA").save(src / "opaque.png")
    (src / "bad.png").write_bytes(b"not an image")
    names = ["rgb0.png", "alpha.png", "bad.png", "rgb1.png", "opaque.png", "rgb2.png"]
    return [Task(src / n, src.parent / "out" / n, n) for n in names]


def comparable(row: Row) -> Row:
    """A row without what legitimately differs between two runs (time, output folder)."""
    return dataclasses.replace(row, seconds=None, output=None, input=Path(row.input).name)


def run_worker(tmp_path: Path, name: str, device: str, dither: str, staging: bool | Stager) -> list[Row]:
    """The rows of a worker run over :func:`write_inputs`, in groups of two (so uploads queue behind a batch)."""
    tasks = write_inputs(tmp_path / name / "in")
    setup = RunSetup(FitOptions(k=6), OutputOptions(dither=dither))
    worker = Worker(setup, device, io_threads=2, group_size=2, staging=staging)
    try:
        return [comparable(row) for row in worker.process(tasks)]
    finally:
        worker.close()


@pytest.mark.parametrize("dither", ["none", "fs"])
def test_on_the_cpu_the_worker_writes_the_same_bytes_with_and_without_staging(tmp_path: Path, dither: str) -> None:
    plain = run_worker(tmp_path, "plain", "cpu", dither, staging=False)
    viewed = run_worker(tmp_path, "viewed", "cpu", dither, staging=True)
    copied = run_worker(tmp_path, "copied", "cpu", dither, staging=Stager("cpu", alloc=CountingAlloc()))
    assert [r.status for r in plain] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert plain == viewed == copied
    outputs = digest(tmp_path / "plain" / "out")
    assert len(outputs) == 5
    assert outputs == digest(tmp_path / "viewed" / "out") == digest(tmp_path / "copied" / "out")


def test_a_copying_stager_leaves_the_item_one_copy_of_its_pixels(tmp_path: Path) -> None:
    task = write_inputs(tmp_path / "in")[0]
    alloc = CountingAlloc()
    worker = Worker(RunSetup(FitOptions(k=6), OutputOptions()), "cpu", io_threads=1, staging=Stager("cpu", alloc))
    try:
        item = worker.read(task)
    finally:
        worker.close()
    assert isinstance(item, Item) and item.staged is not None and alloc.shapes == [(48, 64, 3)]
    assert item.decoded.pixels.ctypes.data == item.staged.data_ptr()  # the writer reads the staged copy


# --- CUDA (run by a GPU session: pytest -m needs_cuda) ---------------------------------------------


def cuda_images() -> list[np.ndarray]:
    """RGB, RGBA with transparency, and an opaque RGBA (which to_tensor reduces to RGB)."""
    opaque = np.concatenate([photo("astronaut")[:64, :48], np.full((64, 48, 1), 255, np.uint8)], axis=2)
    return [decoded_like(photo("chelsea")[:300, :400]), rgba_with_alpha(), opaque]


@needs_cuda
def test_on_cuda_staged_pixels_are_pinned_and_uploads_equal_to_device() -> None:
    stager = Stager("cuda")
    arrays = cuda_images()
    staged = [stager.stage(a) for a in arrays]
    assert all(t.is_pinned() and np.array_equal(t.numpy(), a) for t, a in zip(staged, arrays))
    uploaded = stager.upload(staged)
    assert uploaded.event is not None and stager.copy_stream is not None
    taken = uploaded.take()
    for got, array in zip(taken, arrays):
        want = to_tensor(array).to("cuda")
        assert got.device.type == "cuda" and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)


@needs_cuda
def test_on_cuda_take_makes_the_current_stream_wait_for_a_late_copy() -> None:
    stager = Stager("cuda")
    array = decoded_like(photo("chelsea")[:256, :256])
    assert stager.copy_stream is not None
    with torch.cuda.stream(stager.copy_stream):
        torch.cuda._sleep(200_000_000)  # the copy stream is busy for a while: the copy starts late
    (image,) = stager.upload([stager.stage(array)]).take()
    assert int(image.sum(dtype=torch.int64)) == int(array.sum(dtype=np.int64))


@needs_cuda
def test_on_cuda_a_dropped_pinned_buffer_is_not_reused_before_its_copy_ran() -> None:
    """The caching host allocator keeps a freed block until the copy that reads it completed."""
    stager = Stager("cuda")
    array = decoded_like(photo("chelsea")[:256, :256])
    assert stager.copy_stream is not None
    with torch.cuda.stream(stager.copy_stream):
        torch.cuda._sleep(200_000_000)
    uploaded = stager.upload([stager.stage(array)])
    uploaded.sources.clear()  # the last reference to the pinned block is gone; the copy is still queued
    for _ in range(4):  # same size: a reused block would be overwritten with zeros before the copy read it
        stager.stage(np.zeros_like(array))
    (image,) = uploaded.take()
    assert torch.equal(image.cpu(), torch.from_numpy(np.array(array)))


@needs_cuda
def test_on_cuda_an_image_in_use_keeps_its_memory_from_the_next_upload() -> None:
    """record_stream: freeing an image the current stream still reads must not hand its memory to the copy stream."""
    stager = Stager("cuda")
    first = decoded_like(photo("chelsea")[:256, :256])
    images = stager.upload([stager.stage(first)]).take()
    torch.cuda._sleep(200_000_000)  # the current stream is busy: the sum below runs late
    total = images[0].sum(dtype=torch.int64)
    del images
    later = stager.upload([stager.stage(np.full_like(first, 7))])  # same size, allocated on the copy stream
    assert int(total) == int(first.sum(dtype=np.int64))
    later.take()


@needs_cuda
@pytest.mark.parametrize("dither", ["none", "fs"])
def test_on_cuda_the_worker_writes_the_same_bytes_with_and_without_staging(tmp_path: Path, dither: str) -> None:
    plain = run_worker(tmp_path, "plain", "cuda", dither, staging=False)
    staged = run_worker(tmp_path, "staged", "cuda", dither, staging=True)
    assert [r.status for r in plain] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert plain == staged
    outputs = digest(tmp_path / "plain" / "out")
    assert len(outputs) == 5 and outputs == digest(tmp_path / "staged" / "out")
