"""gpu_kquant: fast k-means colour quantization for whole image datasets.

Batched, weighted k-means in PyTorch (CUDA when present, else CPU), a quantize API
for images, shared palettes, and a streaming directory pipeline
(``python -m gpu_kquant``).
"""

from typing import TYPE_CHECKING, Any

from .kmeans import KMeansResult, kmeans
from .palette import ColorHistogram, Palette
from .quantize import DITHERS, SPACES, Quantized, map_to_palette, quantize, quantize_batch

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .estimator import KMeans


def __getattr__(name: str) -> Any:
    """``KMeans`` on first use: it imports scikit-learn when installed, which took 2.4 s of
    the CLI's 7.2 s start-up (``python -X importtime``, 2-core EPYC), and the CLI never needs it."""
    if name == "KMeans":
        from .estimator import KMeans

        return KMeans
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DITHERS",
    "SPACES",
    "ColorHistogram",
    "KMeans",
    "KMeansResult",
    "Palette",
    "Quantized",
    "__version__",
    "kmeans",
    "map_to_palette",
    "quantize",
    "quantize_batch",
]
