"""Tests of the fit plans (gpu_kquant.fitplan): batched binning changes nothing, per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from common_utils import count_syncs, photo

from gpu_kquant import fitplan
from gpu_kquant.colors import color_sets
from gpu_kquant.options import FitOptions
from gpu_kquant.spaces import ColorSpace


def _images() -> list[np.ndarray]:
    rgba = np.dstack([photo("coffee")[:90, :120], np.tile(np.arange(0, 256, 2, np.uint8)[:120], (90, 1))])
    return [photo("china")[:160, :200], rgba, photo("astronaut")[:2, :3], photo("flower")[100:220, 50:250]]


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_a_batch_fits_what_each_image_fits_alone(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the torch kernels (what CUDA runs) the plans of a batch are binned together, level by level."""
    monkeypatch.setenv("GPU_KQUANT_KERNELS", kernels)
    sets = color_sets([torch.from_numpy(img.copy()) for img in _images()])
    # few fit points: every photo is binned, some twice (coarser than 6 bits)
    options = FitOptions(k=12, space="oklab", max_fit_points=300, n_init=2, seed=3)
    together = fitplan.fit_palettes(sets, options, torch.device("cpu"))
    for cs, (palette, bins) in zip(sets, together):
        ((alone, alone_bins),) = fitplan.fit_palettes([cs], options, torch.device("cpu"))
        assert torch.equal(palette, alone)
        assert (bins is None) == (alone_bins is None)
        if bins is not None and alone_bins is not None:
            assert all(torch.equal(a, b) for a, b in zip(bins, alone_bins))


def test_planning_waits_per_level_not_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_KQUANT_KERNELS", "torch")
    space = ColorSpace("rgb")
    groups = [fitplan._split(cs, space)[1] for cs in color_sets([torch.from_numpy(photo("china")[:200, :200].copy())])]
    few = count_syncs(lambda: fitplan._plans(groups * 2, 300))
    many = count_syncs(lambda: fitplan._plans(groups * 9, 300))
    assert few == many and 0 < len(few) <= 2 * fitplan.FINE_BITS
