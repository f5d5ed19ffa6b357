"""Command-line glue for dataset inputs: the flags, and a run of the shards named on the command line.

``gpu_kquant.cli`` calls :func:`add_dataset_arguments` when it builds its parser and
:func:`run_datasets` first thing in ``main``; image files and folders that are not
dataset inputs go back to the image pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..argtypes import fit_options
from ..imagefiles import IMAGE_EXTENSIONS
from ..palette import Palette
from ..planning import remove_stale_temps, shard_of
from ..report import ReportWriter, RunLock, Summary, check_report_path, new_run_id
from .options import OUTPUT_FORMATS, QUALITY_TOKENS, DatasetOptions
from .run import default_parallel, run_shards, shared_palette
from .shard import output_path
from .sources import Shard, find_shards, folder_shard

__all__ = ["add_dataset_arguments", "run_datasets"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the dataset flags (--output-format, --image-column)."""
    group = parser.add_argument_group(
        "datasets",
        "INPUT may also be WebDataset/img2dataset .tar shards, a folder of them, a brace pattern such as "
        "'shards/{00000..00099}.tar' (quote it), or Parquet files (needs pyarrow: the 'datasets' extra)",
    )
    group.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="files, webdataset (OUT/<shard>.tar), parquet (OUT/<name>.parquet) or tokens (OUT/indices.npy, "
        "needs --palette); default: follows each input (shards give shards, Parquet gives Parquet)",
    )
    group.add_argument(
        "--image-column",
        default=None,
        metavar="NAME",
        help="Parquet image column (default: image, jpg, png, webp or bytes)",
    )


def _collect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[Shard], list[str]]:
    """Shards named on the command line (plus image folders when a container output is asked for)."""
    try:
        shards, rest = find_shards(args.inputs)
    except ValueError as exc:
        parser.error(str(exc))
    if args.output_format in (None, "files"):
        return shards, rest
    for text in rest:
        path = Path(text)
        if not path.is_dir():
            parser.error(f"--output-format {args.output_format} takes shards, Parquet files or folders, not {text}")
        shards.append(folder_shard(path, IMAGE_EXTENSIONS))
    return shards, []


def _palette(
    args: argparse.Namespace, parser: argparse.ArgumentParser, shards: list[Shard], base: DatasetOptions
) -> Palette | None:
    """The fixed palette: ``--palette FILE`` loaded, ``shared`` fitted on every shard (or reused from OUT)."""
    if args.palette is None:
        return None
    try:
        if args.palette == "shared":
            return shared_palette(shards, base)
        path = Path(args.palette)
        return Palette.load(path, space=None if path.suffix.lower() == ".json" else args.space)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"cannot read palette {args.palette}: {exc}")


def _base_options(args: argparse.Namespace, parser: argparse.ArgumentParser, shards: list[Shard]) -> DatasetOptions:
    """Typed options from the flags, before the palette (fitting a shared one waits for the run's lock)."""
    if args.quality is not None and args.output_format == "tokens":  # before a shared palette is fitted
        parser.error(QUALITY_TOKENS)
    if args.processes is not None:
        parser.error("--processes is for image files; shards and Parquet files run in this process")
    if args.quality is not None and args.palette is not None:
        parser.error("--quality picks k per image and --palette fixes the colours; use one of them")
    out = args.out
    if out is None:  # beside the shards' folder, never into it
        base = shards[0].path if shards[0].kind == "files" else shards[0].path.parent
        out = base.parent / f"{base.resolve().name}_k{args.k}"
    cuda = torch.cuda.is_available()
    try:
        return DatasetOptions(
            out=out,
            fit=fit_options(args),
            image_format=args.format,
            compress_level=args.compress_level,
            dither=args.dither,
            device=args.device if args.device != "auto" else ("cuda" if cuda else "cpu"),
            batch_size=args.batch_size or (16 if cuda else 4),
            workers=min(args.workers, 4),
            max_pixels=args.max_pixels,
            resize=args.resize,
            image_column=args.image_column,
            overwrite=args.overwrite,
            quality=args.quality,
            run_id=new_run_id(),  # the report's, also on the manifest's lines (the shared palette's first)
            run_shard=tuple(args.shard),
        )
    except ValueError as exc:
        parser.error(str(exc))


def _options(
    args: argparse.Namespace, parser: argparse.ArgumentParser, shards: list[Shard], common: DatasetOptions
) -> DatasetOptions:
    """The options with the output format and palette; fits the shared palette when asked for (it needs every shard)."""
    palette = _palette(args, parser, shards, common)
    try:
        options = dataclasses.replace(
            common,
            output_format=args.output_format,
            palette=None if palette is None else palette.colors,
            palette_space=args.space if palette is None else palette.space,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for shard in shards:
        if output_path(shard, options).resolve() == shard.path.resolve():
            parser.error(f"the output of {shard.path} would overwrite it; choose another -o")
    return options


def _lock_run(parser: argparse.ArgumentParser, report: Path, shards: list[Shard]) -> RunLock:
    """Check the report path and take the run's lock, or a usage error (exit 2) naming the cause."""
    try:
        check_report_path(report, [s.path for s in shards])
        return RunLock(report).acquire()  # the report writer takes it again (re-entrant in a process)
    except ValueError as exc:
        parser.error(str(exc))


def _report_path(args: argparse.Namespace, options: DatasetOptions, mixed: bool) -> Path:
    """``--report``, else OUT/gpu_kquant_report.jsonl; a run that also has image files gets its own name."""
    index, count = args.shard
    tag = ("" if count == 1 else f".shard-{index}-of-{count}") + (".datasets" if mixed else "")
    report: Path | None = args.report
    if report is not None:
        return report.with_name(report.stem + tag + report.suffix) if mixed else report
    return options.out / f"gpu_kquant_report{tag}.jsonl"


def run_datasets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[int | None, list[str]]:
    """Process the dataset inputs of a parsed command line.

    Returns the exit code (None when there was no dataset input) and the inputs left
    for the image pipeline.
    """
    shards, rest = _collect(args, parser)
    if not shards:
        return None, rest
    common = _base_options(args, parser, shards)
    report_path = _report_path(args, common, bool(rest))
    lock = _lock_run(parser, report_path, shards)  # before the shared palette is fitted and saved in OUT
    try:
        return _run_locked(args, shards, _options(args, parser, shards, common), report_path), rest
    finally:
        lock.release()


def _run_locked(args: argparse.Namespace, shards: list[Shard], options: DatasetOptions, path: Path) -> int:
    """Run the shards of this ``--shard`` under the run's lock; the exit code."""
    index, count = args.shard
    mine = [s for s in shards if count == 1 or shard_of(s.name, count) == index]
    remove_stale_temps([options.out])
    summary = Summary()
    report = ReportWriter(path, summary, run_id=options.run_id)
    parallel = default_parallel(options.device)
    threads = torch.get_num_threads()
    if options.device == "cpu" and parallel > 1:
        torch.set_num_threads(1)  # one torch thread per shard thread: no barrier stalls (see pipeline.Pipeline)
    stop = threading.Event()
    start = time.perf_counter()
    bar = tqdm(unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)

    def emit(row: object) -> None:
        report.write(row)  # type: ignore[arg-type]
        bar.update(1)

    try:
        if args.engine == "ray":
            from .ray_engine import run_shards_ray  # optional dependency, imported only when asked for

            gpus = args.device != "cpu"  # the driver may have no GPU while the workers do
            run_shards_ray(mine, options, emit, address=args.ray_address, assemble_tokens=count == 1, gpus=gpus)
        else:
            run_shards(mine, options, emit, parallel=parallel, assemble_tokens=count == 1, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        summary.interrupted = True
    finally:
        torch.set_num_threads(threads)
        bar.close()
        report.close()
        summary.seconds = time.perf_counter() - start
    for line in summary.lines():
        print(line, file=sys.stderr)
    print(f"  report: {report.path}", file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK
