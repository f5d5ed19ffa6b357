"""Colour space conversions as plain torch functions (any device, any leading shape).

sRGB values are floats in [0, 1] with the IEC 61966-2-1 transfer curve; CIELAB uses
the D65 white point (L in [0, 100]); OKLab follows Björn Ottosson's definition
(L in [0, 1]). Conversions run in float64 internally and return the input's float
dtype (float32 for integer input).
"""

from __future__ import annotations

import torch

__all__ = [
    "lab_to_srgb",
    "linear_to_srgb",
    "oklab_to_srgb",
    "srgb_to_lab",
    "srgb_to_linear",
    "srgb_to_oklab",
]

_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_D65 = (0.95047, 1.0, 1.08883)
_RGB_TO_LMS = (
    (0.4122214708, 0.5363325363, 0.0514459929),
    (0.2119034982, 0.6806995451, 0.1073969566),
    (0.0883024619, 0.2817188376, 0.6299787005),
)
_LMS_TO_OKLAB = (
    (0.2104542553, 0.7936177850, -0.0040720468),
    (1.9779984951, -2.4285922050, 0.4505937099),
    (0.0259040371, 0.7827717662, -0.8086757660),
)
_OKLAB_TO_LMS = (
    (1.0, 0.3963377774, 0.2158037573),
    (1.0, -0.1055613458, -0.0638541728),
    (1.0, -0.0894841775, -1.2914855480),
)
_LMS_TO_RGB = (
    (4.0767416621, -3.3077115913, 0.2309699292),
    (-1.2684380046, 2.6097574011, -0.3413193965),
    (-0.0041960863, -0.7034186147, 1.7076147010),
)
_DELTA = 6.0 / 29.0


def _check(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    if x.shape[-1] != 3:
        raise ValueError(f"expected a tensor of shape (..., 3), got {tuple(x.shape)}")
    out = x.dtype if x.is_floating_point() else torch.float32
    return x.double(), out


def _matmul(x: torch.Tensor, m: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    return x @ torch.tensor(m, dtype=x.dtype, device=x.device).T


def _cbrt(x: torch.Tensor) -> torch.Tensor:
    return x.sign() * x.abs().pow(1.0 / 3.0)


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB (..., 3) in [0, 1] -> linear light (..., 3)."""
    x, dtype = _check(rgb)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055).pow(2.4)).to(dtype)


def linear_to_srgb(lin: torch.Tensor) -> torch.Tensor:
    """Linear light (..., 3) -> sRGB (..., 3), unclamped."""
    x, dtype = _check(lin)
    mag = x.abs()
    curve = torch.where(mag <= 0.0031308, 12.92 * mag, 1.055 * mag.pow(1.0 / 2.4) - 0.055)
    return (x.sign() * curve).to(dtype)


def srgb_to_oklab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB (..., 3) in [0, 1] -> OKLab (..., 3): L in [0, 1], a and b about +-0.4."""
    _, dtype = _check(rgb)
    lms = _matmul(srgb_to_linear(rgb.double()), _RGB_TO_LMS)
    return _matmul(_cbrt(lms), _LMS_TO_OKLAB).to(dtype)


def oklab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """OKLab (..., 3) -> sRGB (..., 3), unclamped (out-of-gamut values leave [0, 1])."""
    x, dtype = _check(lab)
    lms = _matmul(x, _OKLAB_TO_LMS).pow(3)
    return linear_to_srgb(_matmul(lms, _LMS_TO_RGB)).to(dtype)


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB (..., 3) in [0, 1] -> CIELAB D65 (..., 3): L in [0, 100]."""
    _, dtype = _check(rgb)
    xyz = _matmul(srgb_to_linear(rgb.double()), _RGB_TO_XYZ) / torch.tensor(
        _D65, dtype=torch.float64, device=rgb.device
    )
    f = torch.where(xyz > _DELTA**3, _cbrt(xyz), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    lab = torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
    return lab.to(dtype)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB D65 (..., 3) -> sRGB (..., 3), unclamped."""
    x, dtype = _check(lab)
    fy = (x[..., 0] + 16) / 116
    f = torch.stack([fy + x[..., 1] / 500, fy, fy - x[..., 2] / 200], -1)
    xyz = torch.where(f > _DELTA, f.pow(3), 3 * _DELTA**2 * (f - 4.0 / 29.0))
    xyz = xyz * torch.tensor(_D65, dtype=torch.float64, device=lab.device)
    to_rgb = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64, device=lab.device))
    return linear_to_srgb(xyz @ to_rgb.T).to(dtype)
