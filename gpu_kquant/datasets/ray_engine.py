"""The Ray engine for shards: one Ray task per shard, each calling :func:`process_shard`.

Outputs are the local engine's byte for byte (the same function runs; Ray gives each
CPU task one thread, as the local engine gives each shard thread). Inputs and OUT
must be on a file system every node sees at the same paths. The driver writes the
report and assembles tokens; the shared palette is fitted on the driver beforehand.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from ..report import Row
from .options import DatasetOptions
from .run import assemble_run
from .shard import output_path, process_shard
from .sources import Shard

__all__ = ["run_shards_ray"]

RETRIES = 3  # a task whose worker dies (out of memory, a crash) is retried this many times


def run_shards_ray(
    shards: list[Shard],
    options: DatasetOptions,
    emit: Callable[[Row], None],
    *,
    address: str | None = None,
    assemble_tokens: bool = True,
    gpus: bool = True,
) -> None:
    """Process ``shards`` as Ray tasks: GPU tasks when ``gpus`` and the cluster has GPUs, else CPU tasks.

    Joins ``address`` or starts a local Ray; a Ray started here is stopped at the end.
    A task that keeps failing gives a ``failed`` row for its shard.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        # ray leaves cluster_resources() unannotated (a dict of resource name to amount).
        n_gpus = 1 if gpus and ray.cluster_resources().get("GPU", 0) >= 1 else 0  # type: ignore[no-untyped-call]
        task_options = dataclasses.replace(options, device="cuda" if n_gpus else "cpu", workers=1)
        task = ray.remote(num_cpus=1, num_gpus=n_gpus, max_retries=RETRIES)(process_shard)
        refs = {task.remote(shard, task_options): shard for shard in shards}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            shard = refs[done[0]]
            try:
                rows = ray.get(done[0])
            except Exception as exc:  # the task failed RETRIES + 1 times
                reason = f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                rows = [Row(str(shard.path), str(output_path(shard, options)), "failed", reason=reason)]
            for row in rows:
                emit(row)
    finally:
        if started:
            ray.shutdown()
    tokens = [s.name for s in shards if options.format_for(s) == "tokens"]
    if tokens and assemble_tokens:
        for row in assemble_run(tokens, options):
            emit(row)
