"""Fused layer operations (`kernels/layer_ops.py`) against their torch reference (`layer_ops_ref.py`).

``backend="triton"`` forces the kernels: without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1
is set in tests/conftest.py) in float32 / float16; with a CUDA device the same tests run compiled, and
bfloat16 is added.
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.layer_ops import add_rms_norm, rms_norm, rotary, silu_and_mul
from entropyinfer.kernels.layer_ops_ref import add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), [(1, 64), (37, 576), (5, 100), (3, 4096)])
def test_rms_norm_matches_reference(dtype: torch.dtype, rows: int, dim: int) -> None:
    x = randn(rows, dim, dtype=dtype) * 3
    w = randn(dim, dtype=dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        rms_norm(x, w, 1e-5, backend="triton"), rms_norm_ref(x, w, 1e-5), rtol=rtol, atol=atol
    )
    # leading dims and a strided (non-contiguous rows) input
    x3 = randn(2, rows, dim + 7, dtype=dtype)[..., :dim]
    torch.testing.assert_close(
        rms_norm(x3, w, 1e-6, backend="triton"), rms_norm_ref(x3, w, 1e-6), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), [(1, 64), (19, 576), (4, 130)])
def test_add_rms_norm_matches_reference(dtype: torch.dtype, rows: int, dim: int) -> None:
    x, r, w = randn(1, rows, dim, dtype=dtype), randn(1, rows, dim, dtype=dtype), randn(dim, dtype=dtype)
    got, got_sum = add_rms_norm(x, r, w, 1e-5, backend="triton")
    want, want_sum = add_rms_norm_ref(x, r, w, 1e-5)
    assert got.shape == x.shape and got_sum.shape == x.shape
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)  # one rounding of an exact fp32 sum
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_norm_shape_errors() -> None:
    with pytest.raises(ValueError, match="weight"):
        rms_norm(randn(2, 8), randn(7), 1e-5)
    with pytest.raises(ValueError, match="differ"):
        add_rms_norm(randn(2, 8), randn(3, 8), randn(8), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "t", "h", "d", "batched_cos"),
    [(1, 13, 3, 64, False), (2, 5, 17, 128, True), (1, 1, 1, 96, False), (4, 1, 8, 64, True)],
)
def test_rotary_matches_reference(
    dtype: torch.dtype, b: int, t: int, h: int, d: int, batched_cos: bool
) -> None:
    x = randn(b, t, h, d, dtype=dtype)
    freqs = torch.rand(b if batched_cos else 1, t, d // 2, device=DEVICE) * 50
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if not batched_cos:
        cos, sin = cos[0], sin[0]
    rtol, atol = TOL[dtype]
    want = rotary_ref(x, cos, sin)
    torch.testing.assert_close(rotary(x, cos, sin, backend="triton"), want, rtol=rtol, atol=atol)
    # written into a strided destination: a slice of a [B, H, capacity, d] buffer, as the KV cache
    buf = torch.zeros(b, h, t + 9, d, device=DEVICE, dtype=dtype)
    res = rotary(x, cos, sin, out=buf[:, :, 4 : 4 + t], backend="triton")
    assert res.data_ptr() == buf[:, :, 4:].data_ptr()
    torch.testing.assert_close(buf[:, :, 4 : 4 + t], want, rtol=rtol, atol=atol)
    assert not buf[:, :, :4].any() and not buf[:, :, 4 + t :].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 14), (3, 5000), (2, 1, 3072), (7, 2 * 4099)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype) * 4
    rtol, atol = TOL[dtype]
    got = silu_and_mul(x, backend="triton")
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, silu_and_mul_ref(x), rtol=rtol, atol=atol)
    # a strided input (rows of a wider buffer)
    wide = randn(shape[0], shape[-1] + 6, dtype=dtype)[:, : shape[-1]]
    torch.testing.assert_close(
        silu_and_mul(wide, backend="triton"), silu_and_mul_ref(wide), rtol=rtol, atol=atol
    )


def test_empty_and_bad_inputs() -> None:
    assert rms_norm(randn(0, 8), randn(8), 1e-5, backend="triton").shape == (0, 8)
    assert silu_and_mul(randn(0, 8), backend="triton").shape == (0, 4)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(randn(2, 7))


@pytest.mark.skipif(CUDA, reason="CPU serving path")
def test_cpu_runs_reference_by_default() -> None:
    """``backend="auto"`` on CPU tensors is the reference, exactly, whatever TRITON_INTERPRET says."""
    x, r, w = randn(3, 64), randn(3, 64), randn(64)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    for got, want in zip(add_rms_norm(x, r, w, 1e-5), add_rms_norm_ref(x, r, w, 1e-5), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))
    xr = randn(1, 5, 2, 64)
    cos, sin = randn(5, 64), randn(5, 64)
    assert torch.equal(rotary(xr, cos, sin), rotary_ref(xr, cos, sin))
