"""``gpu_kquant.ray``: the Ray engine's public names (kept for existing imports).

The engine lives in :mod:`gpu_kquant.engine_ray`; importing this module imports Ray.
"""

from __future__ import annotations

from .engine_ray import (
    MAX_INPUT_BLOCKS,
    MAX_RESTARTS,
    RESCUE_MIN,
    RETRIES,
    Resources,
    WorkerActor,
    resources,
    run_on_ray,
)
from .ray_histogram import histogram_files, ray_histogram
from .ray_session import STALL_SECONDS

__all__ = [
    "MAX_INPUT_BLOCKS",
    "MAX_RESTARTS",
    "RESCUE_MIN",
    "RETRIES",
    "STALL_SECONDS",
    "Resources",
    "WorkerActor",
    "histogram_files",
    "ray_histogram",
    "resources",
    "run_on_ray",
]
