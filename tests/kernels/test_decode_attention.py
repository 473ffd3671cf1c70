"""Tests of the split-K decode attention kernel (`kernels/decode_attention.py`) and its torch reference.

Layout under test: q [B, Hq, d], k/v caches [B, Hkv, L_max, d] (possibly strided views), per-(sequence, KV
head) int32 lengths [B, Hkv], Hq = G * Hkv. On the CPU, ``backend="triton"`` runs the Triton kernels in the
interpreter (TRITON_INTERPRET=1 is set in tests/conftest.py before triton is imported), in float32/float16
only (the interpreter's bf16 tl.dot is wrong) and on small shapes. With a CUDA device, the `gpu` tests compile
the kernels for real and check bf16/fp16 and CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.backend import interpreter_ready
from entropyinfer.kernels.decode_attention import decode_attention
from entropyinfer.kernels.decode_attention_ref import decode_attention_ref
from entropyinfer.kernels.split_k_merge import DecodeWorkspace, get_workspace
from entropyinfer.kernels.tiling import choose_num_splits, sm_count

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture
def interpret() -> None:
    """The kernels of these tests run on CPU tensors (``backend="triton"``), in the interpreter.

    Triton picks interpreter or compiler when it is first imported: without a GPU tests/conftest.py sets
    TRITON_INTERPRET=1 before that (if it came too late, the launcher raises a clear error). With a GPU the
    kernels are compiled and the `gpu` tests cover them.
    """
    if not interpreter_ready() and torch.cuda.is_available():
        pytest.skip("triton compiles for the GPU in this process; the gpu tests cover the kernels")


def _inputs(
    seed: int,
    batch: int,
    hkv: int,
    group: int,
    l_max: int,
    d: int,
    dtype: torch.dtype,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * group, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, hkv, l_max, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(batch, hkv, l_max, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def _naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per (sequence, query head): softmax(q k^T * scale) v over the head's valid keys, float64."""
    batch, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, d, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            n = int(lengths[b, h // group])
            if n == 0:
                continue
            kk = k[b, h // group, :n].double()
            vv = v[b, h // group, :n].double()
            p = torch.softmax(kk @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ vv
    return out


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOL[dtype])


# ------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize(("group", "d"), [(1, 64), (3, 64), (4, 128)])
def test_reference_matches_naive(group: int, d: int) -> None:
    q, k, v = _inputs(0, 3, 3, group, 21, d, torch.float32)
    lengths = torch.tensor([[0, 1, 21], [7, 20, 13], [21, 21, 21]], dtype=torch.int32)
    ref = decode_attention_ref(q, k, v, lengths)
    torch.testing.assert_close(ref.double(), _naive(q, k, v, lengths, d**-0.5), atol=1e-5, rtol=1e-5)
    assert torch.all(ref[0, :group] == 0)  # length 0: zeros, not NaN
    ref2 = decode_attention_ref(q, k, v, lengths, scale=0.3)
    torch.testing.assert_close(ref2.double(), _naive(q, k, v, lengths, 0.3), atol=1e-5, rtol=1e-5)


def test_reference_fp16_output_dtype() -> None:
    q, k, v = _inputs(1, 1, 2, 2, 9, 64, torch.float16)
    lengths = torch.tensor([[9, 4]], dtype=torch.int32)
    ref = decode_attention_ref(q, k, v, lengths)
    assert ref.dtype == torch.float16
    torch.testing.assert_close(ref.double(), _naive(q, k, v, lengths, 64**-0.5), atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------------- kernel, interpreter

# (group, head_dim, dtype, num_splits): GQA groups 1/3/4/8, d 64/128, one split (direct write) and several.
KERNEL_CASES = [
    (1, 64, torch.float32, 1),
    (1, 128, torch.float16, 3),
    (3, 64, torch.float32, 2),
    (3, 64, torch.float16, 4),
    (4, 128, torch.float32, 3),
    (4, 64, torch.float16, 1),
    (8, 64, torch.float16, 2),
    (8, 128, torch.float32, 5),
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("group", "d", "dtype", "num_splits"), KERNEL_CASES)
def test_kernel_matches_reference(group: int, d: int, dtype: torch.dtype, num_splits: int) -> None:
    # L_max = 83: not a multiple of BLOCK_N (64) nor of the splits; ragged per-head lengths with the
    # capacity edges 0, 1 and L_max, and different lengths across the batch.
    l_max = 83
    q, k, v = _inputs(100 + group * 10 + d, 2, 2, group, l_max, d, dtype)
    lengths = torch.tensor([[0, l_max], [1, 66]], dtype=torch.int32)
    out = decode_attention(q, k, v, lengths, num_splits=num_splits, backend="triton")
    ref = decode_attention_ref(q, k, v, lengths)
    _check(out, ref, dtype)
    assert torch.all(out[0, :group] == 0)


@pytest.mark.usefixtures("interpret")
def test_kernel_default_splits_and_scale() -> None:
    q, k, v = _inputs(7, 1, 3, 3, 300, 64, torch.float32)
    lengths = torch.tensor([[300, 129, 64]], dtype=torch.int32)
    assert choose_num_splits(1, 3, 300, sm_count(q.device)) > 1  # the default path merges splits
    out = decode_attention(q, k, v, lengths, scale=0.2, backend="triton")
    _check(out, decode_attention_ref(q, k, v, lengths, scale=0.2), torch.float32)


@pytest.mark.usefixtures("interpret")
def test_kernel_strided_views_and_out() -> None:
    """Caches sliced out of a bigger preallocated buffer, q/out/lengths as non-contiguous views."""
    batch, hkv, group, l_max, d = 2, 2, 4, 40, 64
    gen = torch.Generator().manual_seed(3)
    big_k = torch.randn(batch + 1, hkv + 2, l_max + 24, d, generator=gen, dtype=torch.float32)
    big_v = torch.randn(batch + 1, hkv + 2, l_max + 24, d, generator=gen, dtype=torch.float32)
    k = big_k[1:, 1 : hkv + 1, 5 : 5 + l_max]
    v = big_v[1:, 2 : hkv + 2, 10 : 10 + l_max]
    big_q = torch.randn(batch, hkv * group, 2 * d, generator=gen)
    q = big_q[:, :, d:]
    lengths = torch.tensor([[40, 0], [17, 33]], dtype=torch.int32).t().contiguous().t()  # strides (1, 2)
    assert not lengths.is_contiguous() and not k.is_contiguous() and not q.is_contiguous()
    out_buf = torch.full((batch, hkv * group + 1, d), 7.0)
    out = out_buf[:, 1:]
    res = decode_attention(q, k, v, lengths, num_splits=3, out=out, backend="triton")
    assert res.data_ptr() == out.data_ptr()
    _check(out, decode_attention_ref(q, k, v, lengths), torch.float32)
    assert torch.all(out_buf[:, 0] == 7.0)  # nothing written outside the view


@pytest.mark.usefixtures("interpret")
def test_kernel_workspace_reuse_and_empty_splits() -> None:
    """Cached scratch reused across calls with new lengths; more splits than tiles; all-zero lengths."""
    q, k, v = _inputs(11, 2, 1, 3, 20, 64, torch.float16)
    ws = get_workspace(q.device, 2, 3, 64, 8)
    assert get_workspace(q.device, 2, 3, 64, 8) is ws
    ws.mid_o.fill_(float("nan"))
    ws.mid_lse.fill_(float("nan"))
    for lens in ([[20], [3]], [[0], [0]], [[1], [19]]):
        lengths = torch.tensor(lens, dtype=torch.int32)
        out = decode_attention(q, k, v, lengths, num_splits=8, backend="triton")
        _check(out, decode_attention_ref(q, k, v, lengths), torch.float16)
    own = DecodeWorkspace(torch.empty(2, 3, 8, 64), torch.empty(2, 3, 8))
    lengths = torch.tensor([[17], [5]], dtype=torch.int32)
    out = decode_attention(q, k, v, lengths, num_splits=8, workspace=own, backend="triton")
    _check(out, decode_attention_ref(q, k, v, lengths), torch.float16)
    with pytest.raises(ValueError, match="workspace shapes"):
        decode_attention(q, k, v, lengths, num_splits=4, workspace=own, backend="triton")


@pytest.mark.usefixtures("interpret")
def test_kernel_int64_lengths_and_clamp() -> None:
    q, k, v = _inputs(12, 1, 2, 2, 30, 64, torch.float32)
    lengths = torch.tensor([[30, 5]], dtype=torch.int64)
    out = decode_attention(q, k, v, lengths, num_splits=2, backend="triton")
    _check(out, decode_attention_ref(q, k, v, lengths), torch.float32)
    over = decode_attention(
        q, k, v, torch.tensor([[99, 5]], dtype=torch.int32), num_splits=2, backend="triton"
    )
    _check(over, out, torch.float32)  # lengths past L_max are clamped to L_max


@pytest.mark.parametrize("interpret_env", ["0", "1"])
def test_cpu_runs_reference_by_default(monkeypatch: pytest.MonkeyPatch, interpret_env: str) -> None:
    """``backend="auto"`` on CPU tensors is the reference, whatever TRITON_INTERPRET says (serving)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret_env)
    q, k, v = _inputs(13, 2, 3, 3, 16, 64, torch.float32)
    lengths = torch.tensor([[16, 0, 5], [1, 2, 3]], dtype=torch.int32)
    ref = decode_attention_ref(q, k, v, lengths)
    assert torch.equal(decode_attention(q, k, v, lengths), ref)
    out = torch.empty_like(q)
    assert decode_attention(q, k, v, lengths, out=out) is out
    assert torch.equal(out, ref)


def test_input_validation() -> None:
    q, k, v = _inputs(14, 1, 2, 2, 8, 64, torch.float32)
    lengths = torch.tensor([[8, 8]], dtype=torch.int32)
    with pytest.raises(ValueError, match="lengths must be"):
        decode_attention(q, k, v, lengths[:, :1])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        decode_attention(q[:, :3], k, v, lengths)
    with pytest.raises(ValueError, match="share a dtype"):
        decode_attention(q, k.half(), v, lengths)
    with pytest.raises(ValueError, match="contiguous last dim"):
        decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lengths)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(q, k, v, lengths, out=torch.empty(1, 4, 32))
    with pytest.raises(ValueError, match="int32"):
        decode_attention(q, k, v, lengths.float())


# ----------------------------------------------------------------------------------------- real GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("group", "d"), [(1, 128), (3, 64), (4, 128), (8, 128), (8, 64), (16, 96), (2, 256)])
def test_gpu_matches_reference(dtype: torch.dtype, group: int, d: int) -> None:
    l_max = 1000
    q, k, v = _inputs(200 + group + d, 3, 2, group, l_max, d, dtype, "cuda")
    lengths = torch.tensor([[0, 1], [l_max, 999], [64, 513]], dtype=torch.int32, device="cuda")
    ref = decode_attention_ref(q, k, v, lengths)
    for splits in (None, 1, 7, 32):
        out = decode_attention(q, k, v, lengths, num_splits=splits)
        _check(out, ref, dtype)


@gpu
def test_gpu_cuda_graph_capture() -> None:
    """Capture once, then change lengths and inputs in place: replays follow them, no reallocation."""
    dtype = torch.bfloat16
    q, k, v = _inputs(300, 2, 4, 4, 2048, 128, dtype, "cuda")
    lengths = torch.tensor([[2048, 1, 0, 700], [5, 2047, 1024, 64]], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    decode_attention(q, k, v, lengths, out=out)  # warm-up: compile and create the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, lengths, out=out)
    gen = torch.Generator().manual_seed(301)
    for _ in range(3):
        lengths.copy_(torch.randint(0, 2049, lengths.shape, generator=gen, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, decode_attention_ref(q, k, v, lengths), dtype)
