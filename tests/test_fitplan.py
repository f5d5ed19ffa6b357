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


@pytest.mark.parametrize(("kernels", "exact_finish"), [("torch", False), ("auto", False), ("auto", True)])
def test_a_batch_fits_what_each_image_fits_alone(
    kernels: str, exact_finish: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the torch kernels (what CUDA runs) the plans of a batch are binned together, level by level."""
    monkeypatch.setenv("GPU_KQUANT_KERNELS", kernels)
    sets = color_sets([torch.from_numpy(img.copy()) for img in _images()])
    # few fit points: every photo is binned, some twice (coarser than 6 bits)
    options = FitOptions(k=12, space="oklab", max_fit_points=300, n_init=2, seed=3, exact_finish=exact_finish)
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


def test_exact_finish_fits_a_dense_dark_sky_as_a_full_fit_does() -> None:
    """A fit on a histogram misplaces entries where colours crowd into few bins; Lloyd on the exact colours does not.

    hubble_deep_field: most pixels are noise within 20 levels of black. Reference: scikit-learn's
    KMeans on every pixel. Measured: 1.12x its MSE from the 5-bit histogram alone, 0.996x finished.
    """
    from test_quantize import sklearn_full_fit_mse

    from gpu_kquant import quantize

    img = np.ascontiguousarray(photo("hubble_deep_field")[::3, ::3])  # 12765 colours
    mse = {
        finish: quantize(img, 32, options=FitOptions(k=32, max_fit_points=1024, exact_finish=finish), device="cpu").mse
        for finish in (False, True)
    }
    reference = sklearn_full_fit_mse(img, 32)
    assert mse[True] <= 1.02 * reference, (mse, reference)
    assert mse[True] < 0.95 * mse[False], mse


def test_exact_finish_ends_at_the_exact_colours_means() -> None:
    """Finished, each entry is (to uint8 rounding) the pixel-weighted mean of the exact colours nearest it."""
    cs = color_sets([torch.from_numpy(np.ascontiguousarray(photo("coffee")[::2, ::2]))])[0]
    options = FitOptions(k=16, max_fit_points=512, exact_finish=True, tol=0.0)
    ((palette, _),) = fitplan.fit_palettes([cs], options, torch.device("cpu"))
    colors, weights = cs.colors.double(), cs.counts.double()
    labels = torch.cdist(colors, palette.double()).argmin(1)
    sums = torch.zeros(palette.shape[0], 3, dtype=torch.float64).index_add_(0, labels, colors * weights[:, None])
    means = sums / torch.zeros(palette.shape[0], dtype=torch.float64).index_add_(0, labels, weights)[:, None]
    assert (means - palette.double()).abs().max() <= 0.5 + 1e-6
