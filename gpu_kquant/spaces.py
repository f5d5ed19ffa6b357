"""Colour space conversions as plain torch functions (any device, any leading shape).

sRGB values are floats in [0, 1] with the IEC 61966-2-1 transfer curve; CIELAB uses
the D65 white point (L in [0, 100]); OKLab follows Björn Ottosson's definition
(L in [0, 1]). Conversions run in float64 internally and return the input's float
dtype (float32 for integer input).
"""

from __future__ import annotations

from typing import ClassVar

import torch

__all__ = [
    "SPACES",
    "ColorSpace",
    "ciede2000",
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


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference (...) between CIELAB colours (..., 3), kL = kC = kH = 1.

    Follows Sharma, Wu and Dalal (2005), including the hue-angle conventions.
    """
    a, _ = _check(lab1)
    b, _ = _check(lab2)
    l1, a1, b1 = a.unbind(-1)
    l2, a2, b2 = b.unbind(-1)
    c_mean = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360
    dlp, dcp = l2 - l1, c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(c1p * c2p == 0, torch.zeros_like(dh), dh)
    dhp = 2 * torch.sqrt(c1p * c2p) * torch.sin(torch.deg2rad(dh / 2))
    lp_mean, cp_mean = (l1 + l2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    hp_mean = torch.where(
        (h1p - h2p).abs() > 180, torch.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2), h_sum / 2
    )
    hp_mean = torch.where(c1p * c2p == 0, h_sum, hp_mean)
    t = (
        1
        - 0.17 * torch.cos(torch.deg2rad(hp_mean - 30))
        + 0.24 * torch.cos(torch.deg2rad(2 * hp_mean))
        + 0.32 * torch.cos(torch.deg2rad(3 * hp_mean + 6))
        - 0.20 * torch.cos(torch.deg2rad(4 * hp_mean - 63))
    )
    sl = 1 + 0.015 * (lp_mean - 50) ** 2 / torch.sqrt(20 + (lp_mean - 50) ** 2)
    sc = 1 + 0.045 * cp_mean
    sh = 1 + 0.015 * cp_mean * t
    rt = (
        -2
        * torch.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
        * torch.sin(torch.deg2rad(60 * torch.exp(-(((hp_mean - 275) / 25) ** 2))))
    )
    de = torch.sqrt((dlp / sl) ** 2 + (dcp / sc) ** 2 + (dhp / sh) ** 2 + rt * (dcp / sc) * (dhp / sh))
    return de.to(lab1.dtype if lab1.is_floating_point() else torch.float32)


SPACES = ("rgb", "oklab", "lab")


class ColorSpace:
    """How uint8 colours become the float points k-means clusters, and back.

    ``rgb`` points are sRGB on 0..255, ``oklab`` is OKLab scaled by 100, ``lab`` is
    CIELAB. RGBA colours become premultiplied colour plus alpha scaled to the colour
    range, so a barely visible pixel barely counts.
    """

    _SCALE: ClassVar[dict[str, float]] = {"rgb": 255.0, "oklab": 100.0, "lab": 1.0}

    def __init__(self, name: str) -> None:
        if name not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {name!r}")
        self.name = name

    def _forward(self, rgb: torch.Tensor) -> torch.Tensor:
        fn = srgb_to_oklab if self.name == "oklab" else srgb_to_lab
        return fn(rgb) * self._SCALE[self.name]

    def _inverse(self, pts: torch.Tensor) -> torch.Tensor:
        if self.name == "rgb":
            return pts / 255.0
        fn = oklab_to_srgb if self.name == "oklab" else lab_to_srgb
        return fn(pts / self._SCALE[self.name])

    @property
    def alpha_scale(self) -> float:
        """Alpha 0..255 is multiplied by this to sit on the colour channels' scale."""
        return 1.0 if self.name == "rgb" else 100.0 / 255.0

    def points(self, colors: torch.Tensor) -> torch.Tensor:
        """uint8 colours (M, 3 or 4) -> float32 points (M, 3 or 4)."""
        if self.name == "rgb" and colors.shape[1] == 3:
            return colors.float()
        pts = colors[:, :3].double() if self.name == "rgb" else self._forward(colors[:, :3].double() / 255.0)
        if colors.shape[1] == 4:
            alpha = colors[:, 3:].double()
            pts = torch.cat([pts * (alpha / 255.0), alpha * self.alpha_scale], dim=1)
        return pts.float()

    def colors(self, pts: torch.Tensor) -> torch.Tensor:
        """Float points (k, 3 or 4) -> the nearest representable uint8 colours."""
        pts = pts.double()
        if pts.shape[1] == 3:
            return self._to_uint8(self._inverse(pts))
        alpha = (pts[:, 3:] / self.alpha_scale).clamp(1.0, 255.0)
        rgb = self._to_uint8(self._inverse(pts[:, :3] * (255.0 / alpha)))
        return torch.cat([rgb, alpha.round().to(torch.uint8)], dim=1)

    @staticmethod
    def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb * 255.0).round().clamp(0, 255).to(torch.uint8)
