"""Colour conversions against float64 references and published values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_kquant.spaces import lab_to_srgb, linear_to_srgb, oklab_to_srgb, srgb_to_lab, srgb_to_linear, srgb_to_oklab

ALL_RGB = torch.stack(torch.meshgrid(*[torch.arange(0, 256, 5)] * 3, indexing="ij"), -1).reshape(-1, 3) / 255.0


@pytest.mark.parametrize(("forward", "inverse"), [(srgb_to_oklab, oklab_to_srgb), (srgb_to_lab, lab_to_srgb)])
def test_round_trip_within_one_level(forward, inverse) -> None:
    back = inverse(forward(ALL_RGB.float()))
    assert back.dtype == torch.float32
    assert float((back.double() - ALL_RGB).abs().max()) < 0.5 / 255


@pytest.mark.parametrize(
    ("rgb", "oklab"),
    [
        ((1.0, 1.0, 1.0), (1.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (0.62796, 0.22486, 0.12585)),
        ((0.0, 0.0, 1.0), (0.45201, -0.03246, -0.31153)),
    ],
)
def test_oklab_reference_values(rgb: tuple, oklab: tuple) -> None:
    np.testing.assert_allclose(srgb_to_oklab(torch.tensor(rgb)).numpy(), oklab, atol=2e-4)


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
        ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ],
)
def test_lab_reference_values(rgb: tuple, lab: tuple) -> None:
    np.testing.assert_allclose(srgb_to_lab(torch.tensor(rgb)).numpy(), lab, atol=2e-3)


def test_lab_matches_skimage() -> None:
    color = pytest.importorskip("skimage.color")
    ours = srgb_to_lab(ALL_RGB).numpy()
    theirs = color.rgb2lab(ALL_RGB.numpy().reshape(-1, 1, 3)).reshape(-1, 3)
    # scikit-image rounds the sRGB -> XYZ matrix differently (about 5e-3 in Lab).
    np.testing.assert_allclose(ours, theirs, atol=1e-2)


def test_transfer_curve() -> None:
    x = torch.linspace(0, 1, 1002, dtype=torch.float64).reshape(-1, 3)
    ref = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(srgb_to_linear(x).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)).numpy(), x.numpy(), atol=1e-12)


def test_integer_input_gives_float32_and_bad_shape_raises() -> None:
    assert srgb_to_oklab(torch.ones(2, 3, dtype=torch.int64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        srgb_to_lab(torch.ones(2, 4))
