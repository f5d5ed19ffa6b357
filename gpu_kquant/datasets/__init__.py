"""Datasets as they come: WebDataset/img2dataset tar shards and Parquet in; shards, Parquet or tokens out.

The narrow interface an engine needs:

- :func:`find_shards` turns command-line inputs into :class:`Shard` objects;
- :func:`process_shard` turns one shard into its output shard and report rows, given
  :class:`DatasetOptions` (call it from any engine: a thread, a process, a Ray task);
- :func:`assemble_tokens` finishes a ``tokens`` run once all shards are done;
- :func:`run_shards` is the local engine; ``gpu_kquant.datasets.ray_engine`` the Ray one;

``gpu_kquant.datasets.cli`` holds the flags and the command-line run.
"""

from .options import OUTPUT_FORMATS, DatasetOptions
from .run import run_shards, shared_palette
from .shard import output_path, process_shard
from .sources import Shard, expand_braces, find_shards, folder_shard
from .tokens import assemble as assemble_tokens

__all__ = [
    "OUTPUT_FORMATS",
    "DatasetOptions",
    "Shard",
    "assemble_tokens",
    "expand_braces",
    "find_shards",
    "folder_shard",
    "output_path",
    "process_shard",
    "run_shards",
    "shared_palette",
]
