"""gpu_kquant: fast k-means colour quantization for whole image datasets.

Batched, weighted k-means in PyTorch (CUDA when present, else CPU), a quantize API
for images, and a streaming directory pipeline (``python -m gpu_kquant``).
"""

from .kmeans import KMeans, KMeansResult, kmeans
from .quantize import SPACES, Quantized, map_to_palette, quantize, quantize_batch

__version__ = "0.1.0"

__all__ = [
    "SPACES",
    "KMeans",
    "KMeansResult",
    "Quantized",
    "__version__",
    "kmeans",
    "map_to_palette",
    "quantize",
    "quantize_batch",
]
