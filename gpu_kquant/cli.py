"""Command line: ``python -m gpu_kquant INPUT... -k 16`` (also the ``gpu-kquant`` script).

Exit codes: 0 when every input succeeded or was skipped, 1 when some failed, 2 for a
usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image
from tqdm import tqdm

from . import __version__
from .argtypes import argument_type, bare_flag_value, fit_options, glue_negative_values, positive, quality, shard
from .budget import parse_size as parse_bytes
from .control import Progress
from .datasets.cli import add_dataset_arguments, run_datasets
from .device import resolve_device
from .dither import DITHERS
from .engine_local import run_local
from .imagefiles import FORMATS
from .naming import display_path
from .options import RESIZE_MODES, EngineOptions, OutputOptions, ResizeOptions, RunOptions, default_workers
from .palette import Palette, PaletteFileError
from .planning import MANIFEST_PREFIX, Job, JobError, plan_job
from .process import configure_process, exit_process
from .report import RunLock, Summary, check_report_path
from .resize import parse_size as parse_dimensions
from .runsetup import check_palette_files, claim_preview_files
from .spaces import SPACES

__all__ = ["ENGINES", "build_parser", "command", "main", "run_options"]

DEMO_OUT = Path("gpu_kquant_demo")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _ray_engine(job: Job, run: RunOptions, progress: Progress) -> Summary:
    from .engine_ray import run_on_ray  # optional dependency, imported only when asked for

    return run_on_ray(job, run, progress)


Engine = Callable[[Job, RunOptions, Progress], Summary]
ENGINES: dict[str, Engine] = {"local": run_local, "ray": _ray_engine}
"""``--engine`` choices: each runs a planned job and returns its summary."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` documents every flag with its default."""
    parser = argparse.ArgumentParser(
        prog="gpu-kquant",
        description=(
            "Quantize every image under INPUT to k colours with k-means (CUDA when present, else CPU) "
            "and write palette images into a mirrored folder tree, with a per-file report."
        ),
        epilog=(
            "Outputs go to a sibling folder DIR_k<k> unless -o is given; outputs its manifest lists as made "
            "with the same options are skipped, so rerunning a command resumes it. Exit codes: 0 all done, "
            "1 some inputs failed, 2 usage error, 130 interrupted."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_run_flags(parser)
    _add_output_flags(parser)
    _add_resize_flags(parser)
    _add_engine_flags(parser)
    add_dataset_arguments(parser)  # shards, Parquet and tokens (gpu_kquant.datasets)
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Inputs, outputs, resume and sharding."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files and/or folders (walked recursively)")
    parser.add_argument(
        "-k",
        "--colors",
        dest="k",
        type=int,
        default=None,
        help="palette size: 2..256, up to 65536 for npz (default: 16; with --palette FILE, the file's size)",
    )
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="output folder (default: DIR_k<k> beside each input folder)"
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="png", help="output format; npz holds indices and palette arrays"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size",
        type=positive,
        default=None,
        help="images per batched k-means at most (default: 256 on CUDA, 4 on the CPU; also closed at 64 megapixels)",
    )
    parser.add_argument("--workers", type=positive, default=default_workers(), help="decode and write threads each")
    parser.add_argument(
        "--processes",
        type=positive,
        default=None,
        metavar="N",
        help="spawned processes per device, each with its share of the cores (default: one per GPU "
        "when there are several, else the run stays in this process)",
    )
    parser.add_argument(
        "--memory-budget",
        type=argument_type(parse_bytes),
        default=None,
        metavar="SIZE",
        help="decoded pixels held at once, e.g. 4G or 512M; a larger image runs alone "
        "(default: a quarter of the available RAM, 256M..16G)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo outputs gpu_kquant wrote before (a file it did not write is never replaced)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="JSON-lines report (default: OUT/gpu_kquant_report.jsonl)"
    )
    parser.add_argument(
        "--shard",
        type=shard,
        default=(0, 1),
        metavar="I/N",
        help="process only shard I of N, 0-based (default: all inputs)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """What is written and how palettes are fitted."""
    parser.add_argument(
        "--compress-level",
        type=int,
        choices=range(10),
        default=None,
        metavar="0-9",
        help="zlib level for PNG (default: 9 up to 8 colours, else 6, as measured; 9 gives the smallest files)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive,
        default=Image.MAX_IMAGE_PIXELS,
        help="reject larger images with a clear reason (default: Pillow's decompression-bomb limit)",
    )
    parser.add_argument(
        "--space",
        choices=SPACES,
        default="rgb",
        help="colour space of the fit and the mapping (lab gives the lowest CIEDE2000)",
    )
    parser.add_argument(
        "--dither",
        choices=DITHERS,
        default="none",
        help="fs: serpentine Floyd-Steinberg; adaptive (a bare --dither): FS with hysteresis in noisy areas, none "
        "next to hard edges, then refined for the eye (fewer dots, truer local means); ordered: 8x8 Bayer",
    )
    parser.add_argument(
        "--palette",
        default=None,
        metavar="shared|FILE",
        help="shared: one palette fitted on all inputs (saved in OUT); FILE: map to a saved palette "
        "(.json, .npy incl. ImageGPT kmeans_centers.npy, .gpl, or a palette PNG)",
    )
    parser.add_argument(
        "--quality",
        type=quality,
        default=None,
        metavar="MIN-MAX",
        help="PSNR dB: use the smallest k up to -k reaching MAX; below MIN do not write the image",
    )
    parser.add_argument("--skip-if-larger", action="store_true", help="never write an output larger than its input")
    parser.add_argument(
        "--ciede2000", action="store_true", help="add the mean CIEDE2000 to the report (always on with --space lab)"
    )
    parser.add_argument(
        "--preview",
        action="store_true",
        help="write an HTML gallery (OUT/preview/index.html); for one input file, a side-by-side PNG",
    )
    parser.add_argument(
        "--n-init", type=positive, default=None, help="k-means++ restarts per image (default: 8 up to k=64, else 1)"
    )
    parser.add_argument("--max-iter", type=positive, default=300, help="Lloyd iterations at most (lower is faster)")
    parser.add_argument(
        "--exact-fit",
        action="store_true",
        help="finish every fit on the image's exact colours, not only under --dither adaptive "
        "(slower; up to +0.5 dB where colours crowd together, as in dark noisy skies)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed and device, same output")


def _add_resize_flags(parser: argparse.ArgumentParser) -> None:
    """--resize and --resize-mode: one step before quantization for every input kind."""
    parser.add_argument(
        "--resize",
        type=argument_type(parse_dimensions),
        default=None,
        metavar="WxH",
        help="resize every image before quantizing (Lanczos, antialiased; files, folders, shards and Parquet)",
    )
    parser.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="fit",
        help="fit: inside WxH, aspect kept; fill: cover WxH and crop the centre; stretch: exactly WxH",
    )


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Engines, the demo and the version."""
    parser.add_argument(
        "--engine",
        choices=tuple(ENGINES),
        default="local",
        help="local threads, or a Ray cluster (needs the 'ray' extra)",
    )
    parser.add_argument(
        "--ray-workers",
        type=positive,
        default=None,
        metavar="N",
        help="quantize actors with --engine ray (default: one per GPU of the cluster, or 1)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to join with --engine ray (default: start a local Ray)",
    )
    parser.add_argument("--demo", action="store_true", help=f"quantize the bundled sample photos into ./{DEMO_OUT}/")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _check_k(args: argparse.Namespace, parser: argparse.ArgumentParser, k_given: bool) -> None:
    """-k and a palette file's size fit the output format; -k beside a palette file of another size warns."""
    top = 1 << 16 if args.format == "npz" else 256
    if not 2 <= args.k <= top:
        parser.error(f"-k must be between 2 and {top} for --format {args.format}, got {args.k}")
    if args.palette not in (None, "shared"):
        try:
            size = len(Palette.load(args.palette))
        except PaletteFileError as exc:  # its message names the file and the cause
            parser.error(f"--palette {exc}")
        except (OSError, ValueError, KeyError, RecursionError, MemoryError) as exc:
            parser.error(f"cannot read palette {args.palette}: {exc}")
        if size > top:
            parser.error(f"palette {args.palette} has {size} colours; --format {args.format} holds at most {top}")
        if k_given and args.k != size:
            warning = f"-k {args.k} is ignored: palette {args.palette} has {size} colours"
            print(f"gpu-kquant: warning: {warning}", file=sys.stderr)


def run_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunOptions:
    """The run's typed options from the parsed flags (usage errors exit 2); ``-k`` unset means 16."""
    inputs = [Path(p) for p in args.inputs]
    if args.demo and inputs:
        parser.error("--demo quantizes the bundled samples; give no INPUT with it")
    if args.quality is not None and args.palette is not None:
        parser.error("--quality picks k per image and --palette fixes the colours; use one of them")
    if args.processes is not None and args.engine != "local":
        parser.error("--processes is for --engine local (Ray places its own actors; see --ray-workers)")
    k_given = args.k is not None
    args.k = 16 if args.k is None else args.k
    out = args.out
    if args.demo:
        inputs = [Path(str(resources.files("gpu_kquant") / "samples"))]
        out = out or DEMO_OUT
    if not inputs:
        parser.error("give at least one INPUT folder or file (or --demo)")
    for path in inputs:
        if not path.exists():
            parser.error(f"input not found: {path}")
    _check_k(args, parser, k_given)
    device = args.device
    if args.engine == "local":  # a Ray driver may have no GPU while its workers do
        try:
            device = str(resolve_device(args.device))
        except ValueError as exc:
            parser.error(str(exc))
    fit = fit_options(args)
    output = OutputOptions(
        out=out,
        format=args.format,
        compress_level=args.compress_level,
        report=args.report,
        palette=args.palette,
        dither=args.dither,
        quality=args.quality,
        overwrite=args.overwrite,
        skip_if_larger=args.skip_if_larger,
        ciede2000=args.ciede2000 or args.space == "lab",  # sampled: cheap (metrics.CIEDE_PIXELS)
        preview=args.preview,
        resize=args.resize,
    )
    engine = EngineOptions(
        engine=args.engine,
        device=device,
        workers=args.workers,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        memory_budget=args.memory_budget,
        shard=args.shard,
        ray_address=args.ray_address,
        ray_workers=args.ray_workers,
        processes=args.processes,
    )
    return RunOptions(tuple(inputs), fit, output, engine)


def _progress_bar(bar: tqdm) -> Progress:
    """A progress callback that moves ``bar`` and shows megapixels per second."""
    pixels = [0]

    def progress(images: int, px: int) -> None:
        pixels[0] += px
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix_str(f"{pixels[0] / 1e6 / elapsed:.1f} MP/s", refresh=False)
        bar.update(images)

    return progress


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    argv = glue_negative_values(sys.argv[1:] if argv is None else list(argv))
    # A bare --dither is adaptive: it meets issue 15's targets against pngquant's dithering on
    # 15/22 photo cases, fs on none (benchmarks/results/dither_refine_*, dither_heldout_*).
    args = parser.parse_args(bare_flag_value(argv, "--dither", DITHERS, "adaptive"))
    # The process entry: what this process needs, set once (library code never does). The
    # decoders enforce --max-pixels themselves with a clear per-file reason.
    configure_process(max_pixels=args.max_pixels)
    k_given = args.k is not None
    args.k = 16 if args.k is None else args.k
    if args.resize is not None:  # one typed option for the image pipeline and the datasets alike
        args.resize = ResizeOptions(args.resize[0], args.resize[1], args.resize_mode)
    datasets_code, args.inputs = run_datasets(args, parser)  # shards and Parquet; returns the other inputs
    if datasets_code is None or args.inputs:
        args.k = args.k if k_given else None
        return max(datasets_code or EXIT_OK, _main_images(args, parser))
    return datasets_code


def _main_images(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The image-file engines over ``args.inputs``; returns the exit code."""
    run = run_options(args, parser)
    cpu_threads = run.engine.engine == "local" and torch.device(run.engine.device or "cpu").type == "cpu"
    configure_process(single_threaded_torch=cpu_threads)
    run_lock: RunLock | None = None
    try:
        try:
            job = plan_job(run)
            check_report_path(job.report, [t.src for t in job.tasks if t.src.name == job.report.name])
            check_palette_files(job, run)  # a user's palette.json in -o is neither reused nor replaced
            run_lock = RunLock(job.report).acquire()  # held to the end; refuses a concurrent run (exit 2)
            claim_preview_files(job, run)  # a user's X.preview.png or preview/ is never replaced
        except ValueError as exc:
            parser.error(str(exc))
        with tqdm(total=len(job.tasks), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
            try:
                summary = ENGINES[run.engine.engine](job, run, _progress_bar(bar))
            except ModuleNotFoundError as exc:
                if exc.name != "ray":
                    raise
                parser.error(str(exc))
    except KeyboardInterrupt:
        print("gpu_kquant: interrupted before any work started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except JobError as exc:
        print(f"gpu-kquant: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if run_lock is not None:
            run_lock.release()
    for line in summary.lines():
        print(line, file=sys.stderr)
    if job.own_outputs:  # what a later run on a parent folder left out, said rather than done silently
        note = f"{job.own_outputs} images left out: outputs of an earlier run, listed in a {MANIFEST_PREFIX}*.jsonl"
        print(f"  {note}", file=sys.stderr)
    print(f"  report: {display_path(job.report)}", file=sys.stderr)
    if args.demo and run.output.out is not None:
        print(f"Demo outputs are in {run.output.out.resolve()}/", file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK


def command() -> NoReturn:
    """The process entry (``gpu-kquant``, ``python -m gpu_kquant``): :func:`main`, then exit.

    Every output write has finished and the report is closed by then, so the process skips
    the interpreter's teardown (:func:`~gpu_kquant.process.exit_process`); after an interrupt
    it also skips the exit handlers instead of waiting for a k-means batch nobody will use.
    """
    code = main()
    exit_process(code, at_once=code == EXIT_INTERRUPTED)
