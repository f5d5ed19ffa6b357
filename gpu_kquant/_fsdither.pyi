"""Types of the compiled Floyd-Steinberg kernel (gpu_kquant/_fsdither.c documents the arguments)."""

from _typeshed import ReadableBuffer, WriteableBuffer

def fs_dither(
    image: ReadableBuffer,
    classes: ReadableBuffer,
    palette: ReadableBuffer,
    flags: ReadableBuffer,
    bounds: ReadableBuffer,
    out: WriteableBuffer,
    strength: ReadableBuffer | None,
    height: int,
    width: int,
    dims: int,
    entries: int,
    max_error: float,
    min_error: float,
    /,
) -> None: ...
