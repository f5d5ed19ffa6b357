"""Every quantizer the benchmarks compare, behind one signature.

A library method is ``run(image, k) -> (palette, indices)``: ``image`` is (H, W, 3)
uint8, ``palette`` (k', 3) uint8 (extra columns and unused entries are ignored) and
``indices`` (H, W) into the palette. What is timed is that whole call, from the
uint8 array to the palette and indices in memory (fit plus mapping every pixel).
No method dithers unless its name says so.

pngquant is a command line tool: its ``cli(input_png, k, output_png)`` builds the
command, and the whole process is timed (PNG decode, quantization, PNG encode).

Imports of optional packages happen inside the functions, so a missing peer only
makes its own methods unavailable (:meth:`Method.missing`).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["METHODS", "Method", "get", "pixels_f32", "select"]

Quantizer = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
CommandLine = Callable[[Path, int, Path], list[str]]
Encoder = Callable[[np.ndarray, np.ndarray], bytes]

SEED = 0
# cv2.kmeans: stop after 100 iterations or when no centre moves more than 0.2 (0..255 units).
OPENCV_CRITERIA = (100, 0.2)
FAISS_NITER = 25
FAISS_SEED = 1234  # faiss.Kmeans's own default seed


@dataclass(frozen=True)
class Method:
    """One quantizer configuration."""

    name: str
    family: str
    description: str
    run: Quantizer | None = None
    cli: CommandLine | None = None
    modules: tuple[str, ...] = ()
    executable: str | None = None
    device: str = "cpu"
    dither: bool = False
    max_k: int = 1 << 16
    min_k: int = 1
    own_png: Encoder | None = None  # the tool's own PNG writer (palette, indices) -> bytes, where it has one

    def supports(self, k: int) -> bool:
        """Whether this method accepts palette size ``k``."""
        return self.min_k <= k <= self.max_k

    def missing(self) -> str | None:
        """Why this method cannot run here, or None when it can."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"Python package {module!r} is not installed"
        if self.executable and shutil.which(self.executable) is None:
            return f"executable {self.executable!r} is not on PATH"
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "CUDA is not available"
        return None

    def prepare(self) -> None:
        """Import the method's packages up front, so imports are neither timed nor counted as its memory."""
        for module in self.modules:
            importlib.import_module(module)
        if self.device == "cuda":
            import torch

            torch.zeros(1, device="cuda")  # create the CUDA context


def pixels_f32(image: np.ndarray) -> np.ndarray:
    """(N, 3) float32 C-contiguous pixels, the input every k-means library expects."""
    return np.ascontiguousarray(image.reshape(-1, 3), dtype=np.float32)


def _round(centres: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(centres), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- gpu_kquant


def gpu_kquant(space: str, device: str) -> Quantizer:
    """``gpu_kquant.quantize`` with its defaults (n_init=8 up to k=64 else 1, max_iter=300, tol=1e-4) and seed 0."""

    def run(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from gpu_kquant import quantize

        q = quantize(image, k, space=space, device=device, seed=SEED)
        return q.palette, q.indices

    return run


def gpu_kquant_png(palette: np.ndarray, indices: np.ndarray) -> bytes:
    """The PNG gpu_kquant itself writes: ``imagefiles.encode("png", ...)`` (indexed, filter None, default level)."""
    from gpu_kquant.imagefiles import encode

    data, _ = encode("png", palette, indices)
    return data


# ----------------------------------------------------------------------------- scikit-learn


def sklearn_full(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's method: ``KMeans(k, n_init=1, random_state=0)`` fitted on every pixel."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=SEED).fit(pixels_f32(image))
    return _round(km.cluster_centers_), km.labels_.reshape(image.shape[:2])


def sklearn_fit_predict(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's loop body: ``KMeans(k, n_init=1, random_state=0).fit(pixels)``, then ``predict(pixels)``."""
    from sklearn.cluster import KMeans

    pixels = pixels_f32(image)
    km = KMeans(n_clusters=k, n_init=1, random_state=SEED).fit(pixels)
    return _round(km.cluster_centers_), km.predict(pixels).reshape(image.shape[:2])


def sklearn_sample(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's colour quantization example: fit on 1000 shuffled pixels, then ``predict`` all."""
    from sklearn.cluster import KMeans
    from sklearn.utils import shuffle

    pixels = pixels_f32(image)
    sample = shuffle(pixels, random_state=SEED, n_samples=min(1000, pixels.shape[0]))
    km = KMeans(n_clusters=k, n_init=1, random_state=SEED).fit(sample)
    return _round(km.cluster_centers_), km.predict(pixels).reshape(image.shape[:2])


# ----------------------------------------------------------------------------- faiss


def faiss_kmeans(subsample: bool) -> Quantizer:
    """``faiss.Kmeans(3, k, niter=25, seed=1234)``, then ``index.search`` for every pixel.

    With ``subsample`` faiss keeps its default ``max_points_per_centroid=256`` (it trains
    on at most 256 k random pixels); otherwise the limit is raised so it trains on all.
    """

    def run(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        pixels = pixels_f32(image)
        options = {} if subsample else {"max_points_per_centroid": math.ceil(pixels.shape[0] / k) + 1}
        km = faiss.Kmeans(3, k, niter=FAISS_NITER, seed=FAISS_SEED, verbose=False, **options)
        km.train(pixels)
        _, labels = km.index.search(pixels, 1)
        return _round(km.centroids), labels.reshape(image.shape[:2])

    return run


# ----------------------------------------------------------------------------- OpenCV


def opencv_kmeans(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.kmeans`` with k-means++ seeding, one attempt, EPS+MAX_ITER criteria (100 iterations, 0.2)."""
    import cv2

    cv2.setRNGSeed(SEED)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, *OPENCV_CRITERIA)
    _, labels, centres = cv2.kmeans(pixels_f32(image), k, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return _round(centres), labels.reshape(image.shape[:2])


# ----------------------------------------------------------------------------- Pillow


def pillow(method: str, kmeans: int = 0) -> Quantizer:
    """``Image.quantize(k, method, kmeans, dither=NONE)``.

    Pillow's ``kmeans`` is not an iteration count: any value > 0 runs Lloyd passes
    until at most ``kmeans - 1`` pixels change their entry, so ``kmeans=1`` runs to
    full convergence. FASTOCTREE ignores it.
    """

    def run(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        out = Image.fromarray(image).quantize(k, method=Image.Quantize[method], kmeans=kmeans, dither=Image.Dither.NONE)
        return np.asarray(out.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3), np.asarray(out)

    return run


# ----------------------------------------------------------------------------- libimagequant


def imagequant_nodither(image: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """libimagequant via the ``imagequant`` package, ``dithering_level=0.0``, default quality 0-100.

    Calls ``quantize_raw_rgba_bytes`` with RGBA bytes made by numpy: the package's
    ``quantize_pil_image`` builds those bytes with a per-pixel Python loop that takes
    longer than the quantization itself on large images.
    """
    import imagequant

    h, w = image.shape[:2]
    rgba = np.empty((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = image
    rgba[..., 3] = 255
    data, palette = imagequant.quantize_raw_rgba_bytes(rgba.tobytes(), w, h, dithering_level=0.0, max_colors=k)
    # The returned palette always has 256 RGBA entries; the unused tail is dropped when scoring.
    return np.asarray(palette, dtype=np.uint8).reshape(-1, 4)[:, :3], np.frombuffer(data, np.uint8).reshape(h, w)


# ----------------------------------------------------------------------------- pngquant


def pngquant(dither: bool) -> CommandLine:
    """``pngquant [--nofs] --force --output OUT k -- IN`` (default speed 4 and quality 0-100)."""

    def argv(src: Path, k: int, dst: Path) -> list[str]:
        flags = [] if dither else ["--nofs"]
        return ["pngquant", *flags, "--force", "--output", str(dst), str(k), "--", str(src)]

    return argv


# ----------------------------------------------------------------------------- registry


def _build() -> dict[str, Method]:
    methods = []
    for device in ("cpu", "cuda"):
        for space in ("rgb", "oklab", "lab"):
            methods.append(
                Method(
                    f"gpu_kquant-{device}-{space}",
                    "gpu_kquant",
                    f"gpu_kquant.quantize on {device.upper()}, fit and mapping in {space}, defaults",
                    run=gpu_kquant(space, device),
                    modules=("torch", "gpu_kquant"),
                    device=device,
                    own_png=gpu_kquant_png,
                )
            )
    methods += [
        Method(
            "sklearn-full",
            "scikit-learn",
            "KMeans(k, n_init=1, random_state=0) on every pixel (float32), labels_ as the mapping",
            run=sklearn_full,
            modules=("sklearn",),
        ),
        Method(
            "sklearn-sample1000",
            "scikit-learn",
            "KMeans(k, n_init=1) on shuffle(pixels, random_state=0, n_samples=1000), then predict",
            run=sklearn_sample,
            modules=("sklearn",),
        ),
        Method(
            "faiss-sub256",
            "faiss",
            f"faiss.Kmeans(3, k, niter={FAISS_NITER}, seed={FAISS_SEED}), default max_points_per_centroid=256; "
            "index.search",
            run=faiss_kmeans(subsample=True),
            modules=("faiss",),
        ),
        Method(
            "faiss-all",
            "faiss",
            f"faiss.Kmeans(3, k, niter={FAISS_NITER}, seed={FAISS_SEED}) trained on every pixel; index.search",
            run=faiss_kmeans(subsample=False),
            modules=("faiss",),
        ),
        Method(
            "opencv-kmeans++",
            "opencv",
            f"cv2.kmeans, KMEANS_PP_CENTERS, attempts=1, criteria EPS+MAX_ITER ({OPENCV_CRITERIA[0]}, "
            f"{OPENCV_CRITERIA[1]})",
            run=opencv_kmeans,
            modules=("cv2",),
        ),
        Method(
            "pillow-mediancut",
            "pillow",
            "Image.quantize(k) (MEDIANCUT, Pillow's default), dither NONE",
            run=pillow("MEDIANCUT"),
            modules=("PIL",),
            max_k=256,
        ),
        Method(
            "pillow-fastoctree",
            "pillow",
            "Image.quantize(k, method=FASTOCTREE), dither NONE",
            run=pillow("FASTOCTREE"),
            modules=("PIL",),
            max_k=256,
        ),
        Method(
            "pillow-mediancut-kmeans1",
            "pillow",
            "Image.quantize(k, MEDIANCUT, kmeans=1): Lloyd passes until no pixel changes",
            run=pillow("MEDIANCUT", kmeans=1),
            modules=("PIL",),
            max_k=256,
        ),
        Method(
            "imagequant",
            "libimagequant",
            "imagequant.quantize_raw_rgba_bytes(dithering_level=0.0, max_colors=k)",
            run=imagequant_nodither,
            modules=("imagequant",),
            max_k=256,
        ),
        Method(
            "pngquant-nofs",
            "pngquant",
            "pngquant --nofs k (whole CLI process, PNG in and out)",
            cli=pngquant(dither=False),
            executable="pngquant",
            max_k=256,
            min_k=2,
        ),
        Method(
            "pngquant-fs",
            "pngquant",
            "pngquant k with its default Floyd-Steinberg dithering (whole CLI process)",
            cli=pngquant(dither=True),
            executable="pngquant",
            dither=True,
            max_k=256,
            min_k=2,
        ),
    ]
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _build()


def get(name: str) -> Method:
    """The method called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def _matches(method: Method, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(method.name, p) or method.family == p for p in patterns)


def select(include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[Method]:
    """Methods whose name (shell pattern) or family is in ``include`` (all when None) and not in ``exclude``."""
    return [m for m in METHODS.values() if (include is None or _matches(m, include)) and not _matches(m, exclude)]
