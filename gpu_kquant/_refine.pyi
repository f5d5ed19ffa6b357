"""Types of the compiled refinement kernel (gpu_kquant/_refine.c documents the arguments)."""

from _typeshed import ReadableBuffer, WriteableBuffer

def refine(
    image: ReadableBuffer,
    classes: ReadableBuffer,
    palette: ReadableBuffer,
    flags: ReadableBuffer,
    neighbours: ReadableBuffer,
    locked: ReadableBuffer | None,
    labels: WriteableBuffer,
    grad: WriteableBuffer,
    a: ReadableBuffer,
    lam: ReadableBuffer,
    height: int,
    width: int,
    dims: int,
    entries: int,
    count: int,
    tol: float,
    huber: float,
    sweeps: int,
    /,
) -> int: ...
