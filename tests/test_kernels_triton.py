"""Triton kernels against the torch reference and a float64 reference (marker ``triton``).

Without CUDA the kernels run on CPU tensors in Triton's interpreter. ``triton.jit``
chooses compiled or interpreted functions when it decorates them, and Triton decorates
its own library when ``triton`` is first imported, so this module sets
``TRITON_INTERPRET=1`` before anything imports triton (only when CUDA is absent: with
CUDA the compiled kernels run on the GPU). Run with:

    pip install triton
    PYTHONPATH=$PWD python -m pytest -m triton tests/test_kernels_triton.py -q

If another test module imported triton first without the variable, these tests skip
with a reason; run them in their own process (or export ``TRITON_INTERPRET=1``).
The interpreter is slow (a few ms per operation), so sizes are small.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module is imported: see the docstring

from gpu_kquant.kernels import reference
from gpu_kquant.kernels import triton_kernels as tk

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not tk.AVAILABLE, reason="no CUDA, and triton was imported before TRITON_INTERPRET=1 was set"),
]
DEVICE = "cpu" if tk.INTERPRET else "cuda"
U32 = 2.0**-24  # float32 unit roundoff


def _rand(gen: torch.Generator, *shape: int, scale: float = 255.0) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen, dtype=torch.float32) * scale).to(DEVICE)


def _real_colours(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """n pixels of a bundled photo (integer colours: many exact distance ties), D coordinates."""
    from PIL import Image

    path = os.path.join(os.path.dirname(tk.__file__), "..", "samples", "coffee.png")
    with Image.open(path) as img:
        pixels = torch.from_numpy(np.asarray(img.convert("RGBA"), dtype=np.float32).reshape(-1, 4))
    rows = pixels[torch.randint(0, pixels.shape[0], (n,), generator=gen)]
    cols = torch.arange(d) % 4
    return rows[:, cols].contiguous()


def _check_against_float64(points: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, d2: torch.Tensor) -> None:
    """Labels are the float64 argmin except where the two nearest float64 distances tie within float32 rounding."""
    x, c = points.double().cpu(), centres.double().cpu()
    d64 = ((x[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)  # (B, N, k)
    best64, arg64 = d64.min(2)
    got = d64.gather(2, labels.cpu()[..., None])[..., 0]
    # A float32 sum of D squared differences is within (D + 2) u of the exact value, relatively.
    slack = 2 * (x.shape[2] + 2) * U32 * got + 1e-30
    differ = labels.cpu() != arg64
    assert torch.all(got[differ] - best64[differ] <= slack[differ]), "a label is not the nearest centroid"
    assert torch.all((d2.double().cpu() - best64).abs() <= slack / 2), "a distance is off by more than float32 rounding"


@pytest.mark.parametrize("d", [3, 4, 7])
@pytest.mark.parametrize("k", [1, 2, 16, 300])
def test_nearest_matches_references(d: int, k: int) -> None:
    gen = torch.Generator().manual_seed(1000 * d + k)
    b = 1 if k > 100 else 2  # the interpreter pays per centroid and per program
    points, centres = _rand(gen, b, 150, d), _rand(gen, b, k, d)
    labels, d2, d2nd = tk.nearest(points, centres, second=True)
    ref_labels, ref_d2, ref_d2nd = reference.nearest(points.cpu(), centres.cpu(), second=True)
    assert labels.dtype == torch.long and d2.dtype == torch.float32
    assert torch.equal(labels.cpu(), ref_labels)
    assert torch.equal(d2.cpu(), ref_d2)
    assert d2nd is not None and ref_d2nd is not None and torch.equal(d2nd.cpu(), ref_d2nd)
    _check_against_float64(points, centres, labels, d2)
    if k == 1:
        assert torch.isinf(d2nd).all()
    _, d2_only, none = tk.nearest(points, centres)
    assert none is None and torch.equal(d2_only, d2)


@pytest.mark.parametrize("d", [3, 4])
def test_nearest_ties_on_real_colours_go_to_lowest_index(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    points = _real_colours(300, d, gen).to(DEVICE)
    centres = points[torch.randint(0, 300, (12,), generator=gen)]
    centres = torch.cat([centres, centres[:4]])[None]  # duplicated centroids: exact ties
    labels, _, d2nd = tk.nearest(points[None], centres, second=True)
    # Integer colours give exact float32 distances: the float64 argmin (first of equals) must match.
    x, c = points.double().cpu(), centres[0].double().cpu()
    d64 = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert torch.equal(labels[0].cpu(), d64.argmin(1))
    assert torch.equal(labels.cpu(), reference.nearest(points[None].cpu(), centres.cpu())[0])
    assert d2nd is not None and torch.all(d2nd[0].cpu().double() == d64.sort(1).values[:, 1])


def _fixed_point(gen: torch.Generator, b: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    qx = torch.randint(-(1 << 50), 1 << 50, (b, n, d), generator=gen)
    qw = torch.randint(0, 1 << 50, (b, n), generator=gen)
    qw[:, ::7] = 0  # padding rows carry weight 0
    return qx.to(DEVICE), qw.to(DEVICE)


@pytest.mark.parametrize("d", [3, 4, 7])
@pytest.mark.parametrize("k", [1, 2, 16, 20, 300])
def test_lloyd_step_sums_are_exact(d: int, k: int) -> None:
    gen = torch.Generator().manual_seed(7 * d + k)
    b = 1 if k > 100 else 2
    points, centres = _rand(gen, b, 140, d), _rand(gen, b, k, d)
    qx, qw = _fixed_point(gen, b, 140, d)
    labels, d2, sums, mass = tk.lloyd_step(points, qx, qw, centres)
    ref = reference.lloyd_step(points.cpu(), qx.cpu(), qw.cpu(), centres.cpu())
    assert torch.equal(labels.cpu(), ref[0]) and torch.equal(d2.cpu(), ref[1])
    assert sums.dtype == mass.dtype == torch.long
    # Exact integer sums, computed independently in Python integers.
    for i in range(b):
        for j in {0, k // 2, k - 1}:
            members = (ref[0][i] == j).numpy()
            assert int(mass[i, j]) == sum(int(v) for v in qw[i].cpu().numpy()[members])
            assert [int(s) for s in sums[i, j]] == [sum(int(v) for v in col) for col in qx[i].cpu().numpy()[members].T]
    assert torch.equal(sums.cpu(), ref[2]) and torch.equal(mass.cpu(), ref[3])


@pytest.mark.parametrize("d", [3, 4, 7])
@pytest.mark.parametrize("n_cand", [1, 3, 20])
def test_kpp_potential_close_to_float64(d: int, n_cand: int) -> None:
    gen = torch.Generator().manual_seed(31 * d + n_cand)
    points, cands = _rand(gen, 2, 300, d), _rand(gen, 2, n_cand, d)
    weights = _rand(gen, 2, 300, scale=3.0)
    closest = _rand(gen, 2, 300, scale=255.0**2 * d / 4)
    got = tk.kpp_potential(points, weights, closest, cands)
    assert got.dtype == torch.float64 and got.shape == (2, n_cand)
    ref = reference.kpp_potential(points.cpu(), weights.cpu(), closest.cpu(), cands.cpu())
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=0.0)
    x, c = points.double().cpu(), cands.double().cpu()
    d64 = torch.minimum(((x[:, :, None] - c[:, None]) ** 2).sum(-1), closest.double().cpu()[..., None])
    exact = (weights.double().cpu()[..., None] * d64).sum(1)
    torch.testing.assert_close(got.cpu(), exact, rtol=(d + 4) * U32, atol=0.0)


@pytest.mark.parametrize("d", [3, 4, 7])
def test_min_update_matches_reference(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    points, centre = _rand(gen, 3, 200, d), _rand(gen, 3, d)
    closest = _rand(gen, 3, 200, scale=255.0**2 * d / 3)
    got = tk.min_update(points, centre, closest)
    assert torch.equal(got.cpu(), reference.min_update(points.cpu(), centre.cpu(), closest.cpu()))
    exact = ((points.double() - centre.double()[:, None]) ** 2).sum(-1).cpu()
    expect = torch.minimum(exact, closest.double().cpu())
    assert torch.all((got.double().cpu() - expect).abs() <= (d + 2) * U32 * expect)


def _in_batch(gen: torch.Generator, x: torch.Tensor, pad: int, fill: float | None) -> torch.Tensor:
    """``x`` (1, n, ...) padded to n + pad points (zeros, or random when ``fill`` is None) as row 1 of 3."""
    if fill is None:
        tail = _rand(gen, 1, pad, *x.shape[2:])
    else:
        tail = torch.full((1, pad, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    row = torch.cat([x, tail.to(x.dtype)], 1)
    others = [_rand(gen, *row.shape).to(x.dtype) if fill is None else row for _ in range(2)]
    return torch.cat([others[0], row, others[1]])


@pytest.mark.parametrize("d", [3, 7])
def test_lloyd_step_batch_independence(d: int) -> None:
    """A problem alone equals the same problem padded with zero-weight points inside a larger batch."""
    gen = torch.Generator().manual_seed(99 + d)
    n, pad, k = 170, 150, 20
    points, centres = _rand(gen, 1, n, d), _rand(gen, 1, k, d)
    qx, qw = _fixed_point(gen, 1, n, d)
    alone = tk.lloyd_step(points, qx, qw, centres)
    big_centres = torch.cat([_rand(gen, 1, k, d), centres, _rand(gen, 1, k, d)])
    big_q = (_in_batch(gen, qx, pad, 0), _in_batch(gen, qw, pad, 0))
    batched = tk.lloyd_step(_in_batch(gen, points, pad, None), *big_q, big_centres)
    assert torch.equal(alone[0][0], batched[0][1, :n]) and torch.equal(alone[1][0], batched[1][1, :n])
    assert torch.equal(alone[2][0], batched[2][1]) and torch.equal(alone[3][0], batched[3][1])


@pytest.mark.parametrize("d", [3, 7])
def test_kpp_potential_batch_independence(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 potentials are bit-identical alone and padded in a batch, and deterministic."""
    # Blocks of 2 x 128 points instead of 32 x 128: the same code with several blocks at sizes
    # the interpreter runs in seconds.
    monkeypatch.setattr(tk, "_KPP_CHUNKS", 2)
    gen = torch.Generator().manual_seed(199 + d)
    n, pad = 300, 250  # blocks of 256 points: two alone, three padded
    points, cands = _rand(gen, 1, n, d), _rand(gen, 1, 5, d)
    weights, closest = _rand(gen, 1, n, scale=2.0), _rand(gen, 1, n, scale=1e4)
    alone = tk.kpp_potential(points, weights, closest, cands)
    big = (_in_batch(gen, points, pad, None), _in_batch(gen, weights, pad, 0), _in_batch(gen, closest, pad, None))
    big_cands = torch.cat([_rand(gen, 1, 5, d), cands, _rand(gen, 1, 5, d)])
    batched = tk.kpp_potential(*big, big_cands)
    assert torch.equal(alone[0], batched[1])
    assert torch.equal(batched, tk.kpp_potential(*big, big_cands)), "not deterministic"


def test_map_pixels_and_edge_shapes() -> None:
    gen = torch.Generator().manual_seed(5)
    pixels, palette = _rand(gen, 2, 64, 3), _rand(gen, 2, 16, 3)
    assert torch.equal(tk.map_pixels(pixels, palette), tk.nearest(pixels, palette)[0])
    empty = tk.nearest(pixels[:, :0], palette, second=True)
    assert empty[0].shape == (2, 0) and empty[2] is not None and empty[2].shape == (2, 0)
    assert tk.kpp_potential(pixels[:, :0], pixels[:, :0, 0], pixels[:, :0, 0], palette[:, :2]).eq(0).all()
    with pytest.raises(TypeError, match="float32"):
        tk.nearest(pixels.double(), palette.double())
    with pytest.raises(ValueError, match="do not fit"):
        tk.nearest(pixels, palette[..., :2].contiguous())


_PTX_SCRIPT = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gpu_kquant.kernels import triton_kernels as tk

def ptx(fn, sig, consts):
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]

names = "p_ptr c_ptr lab_ptr d2_ptr d2nd_ptr qx_ptr qw_ptr sums_ptr mass_ptr".split()
types = ["*fp32", "*fp32", "*i64", "*fp32", "*fp32", "*i64", "*i64", "*i64", "*i64"]
consts = dict.fromkeys("D SECOND SUMS TILE_K BLOCK_N UNROLL".split(), "constexpr")
sig = dict(zip(names, types), N="i32", K="i32", **consts)
for d, tile in ((3, 0), (4, 16)):
    text = ptx(tk._nearest_kernel, sig, dict(D=d, SECOND=True, SUMS=True, TILE_K=tile, BLOCK_N=512, UNROLL=4))
    # int64 atomic adds: "red." up to Triton 3.7, "atom." from 3.8 (same instruction class); never float atomics
    ints = bool(re.search(r"\\b(?:red|atom)\\.global\\.[\\w.]*add\\.u64\\b", text))
    floats = bool(re.search(r"\\b(?:red|atom)\\.[\\w.]*add\\.f(?:16|32|64)\\b", text))
    print(d, tile, len(re.findall(r"\\bfma\\.", text)), ints and not floats, "mul.rn.f32" in text)
names = "p_ptr w_ptr cl_ptr cand_ptr part_ptr".split()
sig = dict(zip(names, ["*fp32"] * 4 + ["*fp64"]), N="i32", L="i32", NB="i32")
sig.update(dict.fromkeys("D BLOCK_N BLOCK_L CHUNKS".split(), "constexpr"))
text = ptx(tk._kpp_partial_kernel, sig, dict(D=4, BLOCK_N=128, BLOCK_L=16, CHUNKS=32))
print("kpp", len(re.findall(r"\\bfma\\.", text)), "add.rn.f64" in text)
"""


@pytest.mark.skipif(not tk.INTERPRET, reason="on CUDA the other tests run the compiled kernels")
def test_compiled_kernels_have_no_fma_and_integer_atomics() -> None:
    """Compiles the fused kernel to PTX for sm_90 without a GPU: no fused multiply-add, int64 atomics."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(tk.__file__), "..", "..")
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600, check=False)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower():
        pytest.skip(f"cannot compile PTX here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")[-4:-1]
    assert lines == ["3 0 0 True True", "4 16 0 True True", "kpp 0 True"], proc.stdout
