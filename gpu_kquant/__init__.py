"""gpu_kquant: fast k-means colour quantization for whole image datasets.

Batched, weighted k-means in PyTorch (CUDA when present, else CPU), a quantize API
for images, shared palettes, and a streaming directory pipeline
(``python -m gpu_kquant``).
"""

from .estimator import KMeans
from .kmeans import KMeansResult, kmeans
from .palette import ColorHistogram, Palette
from .quantize import DITHERS, SPACES, Quantized, map_to_palette, quantize, quantize_batch

__version__ = "0.1.0"

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
