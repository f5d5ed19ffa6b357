"""Device selection and numeric settings shared by the engine and the pipeline."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["exact_float32_matmul", "resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn a user's device argument into a concrete :class:`torch.device`.

    ``None`` and ``"auto"`` mean CUDA when available, else CPU. A CUDA device that
    is asked for but not present raises ``ValueError`` with a one-line reason.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """Run float32 matmuls in full IEEE precision inside the block.

    TF32 keeps a 10-bit mantissa, which flips nearest-centroid argmins; the user's
    global setting is restored on exit.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        saved = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:  # older torch
        saved_flag = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved_flag
