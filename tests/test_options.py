"""Typed run options: frozen, whole, with the defaults the CLI documents."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gpu_kquant.options import EngineOptions, FitOptions, OutputOptions, RunOptions


def test_run_options_are_frozen_and_hold_paths() -> None:
    run = RunOptions(["a", Path("b")])  # type: ignore[arg-type]
    assert run.inputs == (Path("a"), Path("b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.fit = FitOptions(k=4)  # type: ignore[misc]
    assert hash(run.output) == hash(OutputOptions())  # frozen option objects are values


def test_defaults() -> None:
    assert FitOptions().k == 16 and OutputOptions().format == "png" and OutputOptions().dither == "none"
    engine = EngineOptions()
    assert engine.engine == "local" and engine.workers >= 1 and engine.shard == (0, 1)
    with pytest.raises(ValueError, match="k must be"):
        FitOptions(k=0)
