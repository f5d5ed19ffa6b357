"""CPU kernels: the compiled C extension ``gpu_kquant._kernels`` (filled in below)."""

from __future__ import annotations

AVAILABLE = False
