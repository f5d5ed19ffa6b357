"""What a run decides once, on the driver, before any image is processed.

The fixed palette (``--palette FILE`` or ``shared``) and where previews go become one
frozen :class:`RunSetup` that every worker receives whole (a Ray actor once, in its
constructor). Options never change after the CLI built them; decided values live here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .fitting import fit_shared_palette
from .manifest import Manifest
from .options import FitOptions, OutputOptions, RunOptions
from .palette import ColorHistogram, Palette
from .planning import Job, JobError, Task, all_shards, plan_tasks
from .preview import ENTRIES as GALLERY_MARKER
from .sharedpalette import foreign_palette_file, reusable_palette, save_palette

__all__ = [
    "HistogramPass",
    "PreviewTarget",
    "RunSetup",
    "check_palette_files",
    "claim_preview_files",
    "preview_target",
    "resolve_palette",
    "setup_run",
    "shared_palette_to_fit",
    "side_by_side_path",
]

HistogramPass = Callable[[list[Task], RunOptions, torch.device], ColorHistogram]
"""The ``--palette shared`` first pass of an engine: every input's colours summed exactly."""


@dataclass(frozen=True)
class PreviewTarget:
    """Where preview files go: a gallery folder, or (one input file) a side-by-side PNG beside the output."""

    folder: Path
    side_by_side: bool


def side_by_side_path(dst: Path) -> Path:
    """The side-by-side preview of the output ``dst``: ``X.preview.png`` beside it."""
    return dst.with_name(dst.stem + ".preview.png")


def preview_target(job: Job, run: RunOptions) -> PreviewTarget | None:
    """Where this run's previews go (``--preview``), or None."""
    if not run.output.preview:
        return None
    if len(run.inputs) == 1 and run.inputs[0].is_file() and job.tasks:
        return PreviewTarget(job.tasks[0].dst.parent, side_by_side=True)
    return PreviewTarget(job.out_dir / "preview", side_by_side=False)


def claim_preview_files(job: Job, run: RunOptions) -> None:
    """Claim where ``--preview`` writes in the output folder's manifest, so that a rerun may replace it.

    The side-by-side PNG of one input file is claimed itself; a gallery folder is claimed
    through its ``entries.jsonl`` (every file in a gallery folder is gpu_kquant's).

    Raises:
        ValueError: the side-by-side PNG, or a non-empty gallery folder, exists and was not
            written by gpu_kquant (the manifest does not list it): nothing there is replaced,
            even with ``--overwrite`` (the CLI's usage error, exit 2).
    """
    target = preview_target(job, run)
    if target is None:
        return
    if target.side_by_side:
        paths = [side_by_side_path(job.tasks[0].dst)]
    else:
        paths = [target.folder / GALLERY_MARKER, target.folder / "index.html"]
    roots = [job.out_dir] if run.output.out is not None else job.roots  # the outputs' manifests (open_manifest)
    manifest = Manifest(roots, {"preview": target.side_by_side}, "", run.engine.shard)
    try:
        reason = _foreign_preview(manifest, target, paths[0])
        if reason is not None:
            raise ValueError(reason)
        manifest.claim(paths)  # before the writes: known as ours to every later run
    finally:
        manifest.close()


def _foreign_preview(manifest: Manifest, target: PreviewTarget, marker: Path) -> str | None:
    """Why the preview cannot be written where ``target`` says (a file not gpu_kquant's), or None."""
    if target.side_by_side:
        if manifest.foreign_reason(marker) is None:
            return None
        return f"preview {marker} exists and was not written by gpu_kquant; move it or choose another -o"
    folder = target.folder
    if not folder.is_dir() or not any(folder.iterdir()):
        return None if not folder.exists() or folder.is_dir() else f"preview folder {folder} is a file; move it"
    if marker.exists() and manifest.foreign_reason(marker) is None:
        return None
    return f"preview folder {folder} exists and is not a gpu_kquant gallery; move it or choose another -o"


@dataclass(frozen=True)
class RunSetup:
    """Everything a worker needs, decided once per run.

    Attributes:
        fit: the fit options (``k`` is the fixed palette's size when there is one).
        output: what is written and the policies.
        palette: the fixed palette every image maps to, or ``None`` (fit one per image).
        preview: where previews go, or ``None``.
        max_pixels: inputs above this many pixels fail (``None``: no limit).
        batch_pixels: a k-means batch closes at this many pixels.
        memory_budget: bytes of decoded pixels a worker process holds at once (``None``:
            :func:`gpu_kquant.budget.default_memory_budget` where it runs); see ``--memory-budget``.
    """

    fit: FitOptions
    output: OutputOptions
    palette: Palette | None = None
    preview: PreviewTarget | None = None
    max_pixels: int | None = None
    batch_pixels: int = 64_000_000
    memory_budget: int | None = None

    @property
    def space(self) -> str:
        """The colour space of the mapping: the fixed palette's, else the fit's."""
        return self.palette.space if self.palette is not None else self.fit.space


def _palette_manifest(run: RunOptions, out_dir: Path) -> Manifest:
    """The manifest that vouches for the shared palette's files in ``out_dir``."""
    return Manifest([out_dir], {"shared_palette": dataclasses.asdict(run.fit)}, "", run.engine.shard)


def check_palette_files(job: Job, run: RunOptions) -> None:
    """Refuse a ``--palette shared`` run whose output folder holds a palette file gpu_kquant did not write.

    Such a file is never read as the saved palette nor replaced, even with ``--overwrite``.

    Raises:
        ValueError: the one-line reason (the CLI's usage error, exit 2).
    """
    if run.output.palette != "shared":
        return
    manifest = _palette_manifest(run, job.out_dir)
    reason = foreign_palette_file(manifest, job.out_dir)
    manifest.close()
    if reason is not None:
        raise ValueError(reason)


def shared_palette_to_fit(job: Job, run: RunOptions) -> bool:
    """Whether this run fits a shared palette (``--palette shared`` with none to reuse)."""
    if run.output.palette != "shared":
        return False
    manifest = _palette_manifest(run, job.out_dir)
    try:
        return reusable_palette(manifest, job.out_dir, run.output.overwrite) is None
    except ValueError:  # a foreign file: resolve_palette says so
        return True
    finally:
        manifest.close()


def resolve_palette(job: Job, run: RunOptions, device: torch.device, histogram: HistogramPass) -> Palette | None:
    """The fixed palette of this run (``--palette FILE`` or ``shared``), or None.

    A shared palette already saved in the output folder, intact and fitted with these fit
    options, is reused (so a resumed run maps to the same palette); otherwise it is fitted
    on the histogram of every input, over all shards (``histogram`` runs that pass: local threads, or Ray), and saved as
    palette.json, palette.npy and palette.gpl, each recorded in the output folder's manifest.

    Raises:
        JobError: a palette file there was not written by gpu_kquant (the manifest does not
            list it): it is neither reused nor replaced.
    """
    choice = run.output.palette
    if choice is None:
        return None
    if choice != "shared":
        path = Path(choice)
        try:
            return Palette.load(path, space=None if path.suffix.lower() == ".json" else run.fit.space)
        except (OSError, ValueError, KeyError) as exc:
            raise JobError(f"cannot read palette {path}: {exc}") from None
    manifest = _palette_manifest(run, job.out_dir)
    try:
        try:
            saved = reusable_palette(manifest, job.out_dir, run.output.overwrite)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        if saved is not None:
            return saved
        everything, _, _ = plan_tasks(all_shards(run))
        hist = histogram(everything, run, device)
        if hist.pixels == 0:
            raise JobError("no decodable image to fit a shared palette on")
        palette = fit_shared_palette(hist, run.fit, device)
        save_palette(palette, job.out_dir, manifest)
        return palette
    finally:
        manifest.close()


def setup_run(job: Job, run: RunOptions, device: torch.device, histogram: HistogramPass) -> RunSetup:
    """Decide the fixed palette and the preview target of a planned run."""
    preview = preview_target(job, run)
    palette = resolve_palette(job, run, device, histogram)
    fit = run.fit if palette is None else dataclasses.replace(run.fit, k=len(palette))
    engine = run.engine
    return RunSetup(fit, run.output, palette, preview, engine.max_pixels, engine.batch_pixels, engine.memory_budget)
