"""Tests of the block-sparse prefill attention kernel (`kernels/sparse_prefill.py`) and its torch reference.

``backend="triton"`` forces the kernel: on the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1 is set
in tests/conftest.py before triton is imported), in float32/float16 only (the interpreter's bf16 tl.dot is
wrong), on small shapes. With a CUDA device the same
tests compile the kernel for real, and the `gpu` tests add bf16 and the production tile table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from entropyinfer.kernels.backend import Backend
from entropyinfer.kernels.block_layout import num_segments
from entropyinfer.kernels.sparse_prefill import dense_causal_attention, sparse_prefill_attention
from entropyinfer.kernels.sparse_prefill_ref import sparse_prefill_attention_ref
from entropyinfer.kernels.tiling import TileConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # atol = rtol
PAD_ID = 123_456  # written past every count: the kernel must never read it
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def make_qkv(
    hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n, d, generator=gen) for h in (hq, hkv, hkv))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def make_blocks(
    hkv: int, n_total: int, seg: int, b: int, mode: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists for every (KV head, segment) of a prompt of ``n_total`` tokens.

    mode: ``random`` (own list and count per head), ``shared`` (one list for all heads), ``all`` (every
    visible block), ``zero`` (no block), ``mixed`` (random, some segments dense with count -1).
    """
    gen = torch.Generator().manual_seed(seed)
    nseg = num_segments(n_total, seg)
    max_k = max(1, (nseg - 1) * seg // b)
    idx = torch.full((hkv, nseg, max_k), PAD_ID, dtype=torch.int32)
    cnt = torch.zeros(hkv, nseg, dtype=torch.int32)
    for s in range(nseg):
        visible = s * seg // b
        shared_pick = torch.randperm(visible, generator=gen)
        shared_c = int(torch.randint(0, visible + 1, (1,), generator=gen))
        for h in range(hkv):
            if mode == "all":
                c, pick = visible, torch.arange(visible)
            elif mode == "zero":
                c, pick = 0, torch.arange(0)
            elif mode == "shared":
                c, pick = shared_c, shared_pick
            else:
                c = int(torch.randint(0, visible + 1, (1,), generator=gen))
                pick = torch.randperm(visible, generator=gen)
            ids = pick[:c].sort().values
            idx[h, s, :c] = ids.to(torch.int32)
            cnt[h, s] = c
            if mode == "mixed" and s > 0 and bool(torch.rand(1, generator=gen) < 0.4):
                cnt[h, s] = -1
    return idx.to(DEVICE), cnt.to(DEVICE)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    seg: int,
    b: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """Masked softmax attention from an explicit [Hkv, Nq, Nk] boolean mask, K/V repeated per query head."""
    hq, nq, d = q.shape
    hkv, nk, _ = k.shape
    group = hq // hkv
    mask = torch.zeros(hkv, nq, nk, dtype=torch.bool)
    for r in range(nq):
        p = q_offset + r
        s = p // seg
        for h in range(hkv):
            c = int(block_cnt[h, s])
            if c < 0:
                mask[h, r, : s * seg] = True
            for j in block_idx[h, s, : max(c, 0)].tolist():
                mask[h, r, j * b : (j + 1) * b] = True
            mask[h, r, s * seg : p + 1] = True
    mask = mask.repeat_interleave(group, 0).to(q.device)
    kr, vr = (t.float().repeat_interleave(group, 0) for t in (k, v))
    scores = torch.matmul(q.float(), kr.transpose(1, 2)) * d**-0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, vr).to(q.dtype)


def run_both(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    cnt: torch.Tensor,
    seg: int,
    b: int,
    q_offset: int = 0,
    config: TileConfig | None = None,
    backend: Backend = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"segment_size": seg, "block_size": b, "q_offset": q_offset}
    out = sparse_prefill_attention(q, k, v, idx, cnt, config=config, backend=backend, **kw)
    ref = sparse_prefill_attention_ref(q, k, v, idx, cnt, **kw)
    return out, ref


@pytest.mark.parametrize(
    ("hq", "hkv", "n", "seg", "b", "mode", "q_offset"),
    [
        (4, 2, 80, 16, 4, "random", 0),
        (8, 2, 77, 32, 8, "mixed", 0),
        (9, 3, 70, 32, 8, "shared", 0),
        (4, 1, 96, 32, 8, "random", 37),
    ],
)
def test_reference_matches_naive_mask(
    hq: int, hkv: int, n: int, seg: int, b: int, mode: str, q_offset: int
) -> None:
    q, k, v = make_qkv(hq, hkv, n, 16, torch.float32, seed=n + hq)
    idx, cnt = make_blocks(hkv, n, seg, b, mode, seed=n)
    qc = q[:, q_offset:]
    ref = sparse_prefill_attention_ref(qc, k, v, idx, cnt, segment_size=seg, block_size=b, q_offset=q_offset)
    naive = naive_attention(qc, k, v, idx, cnt, seg, b, q_offset)
    torch.testing.assert_close(ref, naive, atol=1e-5, rtol=1e-5)


def test_reference_rejects_invisible_block() -> None:
    q, k, v = make_qkv(2, 1, 64, 16, torch.float32, seed=0)
    idx, cnt = make_blocks(1, 64, 32, 8, "all", seed=0)
    idx[0, 1, 0] = 4  # keys [32, 40): inside segment 1 itself
    with pytest.raises(ValueError, match="block ids"):
        sparse_prefill_attention_ref(q, k, v, idx, cnt, segment_size=32, block_size=8)


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("mode", "n", "seg", "b"),
    [
        ("shared", 128, 32, 8),  # identical lists across heads
        ("random", 128, 32, 8),  # own list and count per head
        ("random", 109, 32, 8),  # ragged: N not a multiple of S, b or the tile
        ("all", 100, 32, 8),  # counts = every visible block
        ("zero", 100, 32, 8),  # count 0: own segment only
        ("mixed", 120, 32, 8),  # dense (-1) segments among sparse ones
        ("random", 27, 32, 8),  # one segment only
        ("random", 150, 64, 12),  # block size not a power of two
    ],
)
def test_kernel_matches_reference(mode: str, n: int, seg: int, b: int, dtype: torch.dtype) -> None:
    hq, hkv, d = 8, 2, 32
    q, k, v = make_qkv(hq, hkv, n, d, dtype, seed=n + seg)
    idx, cnt = make_blocks(hkv, n, seg, b, mode, seed=n + b)
    out, ref = run_both(q, k, v, idx, cnt, seg, b)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "d"), [(3, 3, 32), (8, 2, 32), (16, 2, 16), (9, 3, 64)])
def test_kernel_gqa_groups(hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    n, seg, b = 90, 32, 8
    q, k, v = make_qkv(hq, hkv, n, d, dtype, seed=hq * 10 + hkv)
    idx, cnt = make_blocks(hkv, n, seg, b, "mixed", seed=hq)
    out, ref = run_both(q, k, v, idx, cnt, seg, b)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_offset", [40, 64, 101])
def test_kernel_chunk_with_q_offset(q_offset: int, dtype: torch.dtype) -> None:
    n, seg, b = 128, 32, 8
    q, k, v = make_qkv(8, 2, n, 32, dtype, seed=q_offset)
    idx, cnt = make_blocks(2, n, seg, b, "mixed", seed=q_offset)
    qc = q[:, q_offset:]
    out, ref = run_both(qc, k, v, idx, cnt, seg, b, q_offset=q_offset)
    assert_close(out, ref, dtype)
    full = sparse_prefill_attention_ref(q, k, v, idx, cnt, segment_size=seg, block_size=b)
    assert_close(out, full[:, q_offset:], dtype)


@pytest.mark.parametrize(
    "config",
    [
        TileConfig(block_m=32, block_n=64, num_warps=4, num_stages=2),  # key tile wider than the query tile
        TileConfig(block_m=64, block_n=16, num_warps=4, num_stages=2),  # several diagonal tiles
        TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=2),  # block (32) wider than the key tile
    ],
)
def test_kernel_tile_shapes(config: TileConfig) -> None:
    n, seg, b = 150, 64, 32
    q, k, v = make_qkv(4, 2, n, 32, torch.float32, seed=config.block_m)
    idx, cnt = make_blocks(2, n, seg, b, "mixed", seed=config.block_n)
    out, ref = run_both(q, k, v, idx, cnt, seg, b, config=config)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 32), (8, 2, 32), (9, 3, 64)])
def test_dense_causal_matches_sdpa(hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    n = 75
    q, k, v = make_qkv(hq, hkv, n, d, dtype, seed=hq + d)
    group = hq // hkv
    kr, vr = (t.repeat_interleave(group, 0) for t in (k, v))
    sdpa = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), is_causal=True).to(dtype)
    assert_close(dense_causal_attention(q, k, v, backend="triton"), sdpa, dtype)
    # every segment dense through the sparse entry point, with a small S, is the same attention
    seg = 16
    nseg = num_segments(n, seg)
    idx = torch.zeros(hkv, nseg, 1, dtype=torch.int32, device=DEVICE)
    cnt = torch.full((hkv, nseg), -1, dtype=torch.int32, device=DEVICE)
    out = sparse_prefill_attention(q, k, v, idx, cnt, segment_size=seg, block_size=8, backend="triton")
    assert_close(out, sdpa, dtype)
    # a chunk at q_offset > 0 against all earlier keys
    off = 29
    mask = torch.ones(n - off, n, dtype=torch.bool, device=DEVICE).tril(diagonal=off)
    sdpa_c = F.scaled_dot_product_attention(q[:, off:].float(), kr.float(), vr.float(), attn_mask=mask)
    got = dense_causal_attention(q[:, off:], k, v, q_offset=off, backend="triton")
    assert_close(got, sdpa_c.to(dtype), dtype)


def test_all_visible_blocks_equal_dense() -> None:
    """Selecting every visible block through the gather path is dense causal attention."""
    n, seg, b = 96, 32, 8
    q, k, v = make_qkv(8, 2, n, 32, torch.float16, seed=5)
    idx, cnt = make_blocks(2, n, seg, b, "all", seed=5)
    out = sparse_prefill_attention(q, k, v, idx, cnt, segment_size=seg, block_size=b, backend="triton")
    kr, vr = (t.float().repeat_interleave(4, 0) for t in (k, v))
    sdpa = F.scaled_dot_product_attention(q.float(), kr, vr, is_causal=True).to(torch.float16)
    assert_close(out, sdpa, torch.float16)


def test_custom_scale_and_strided_inputs() -> None:
    n, seg, b = 64, 32, 8
    base = torch.randn(n, 6, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q = base[:, :4].transpose(0, 1)  # [4, n, 32] view, token stride 6*32
    k = base[:, 4:5].transpose(0, 1)
    v = base[:, 5:6].transpose(0, 1)
    idx, cnt = make_blocks(1, n, seg, b, "random", seed=3)
    kw = {"segment_size": seg, "block_size": b, "scale": 0.3}
    out = sparse_prefill_attention(q, k, v, idx, cnt, **kw, backend="triton")
    ref = sparse_prefill_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), idx, cnt, **kw)
    assert_close(out, ref, torch.float32)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU fallback")
@pytest.mark.parametrize("interpret_env", ["0", "1"])
def test_cpu_runs_reference_by_default(monkeypatch: pytest.MonkeyPatch, interpret_env: str) -> None:
    """``backend="auto"`` on CPU tensors is the reference, whatever TRITON_INTERPRET says (serving)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret_env)
    q, k, v = make_qkv(4, 2, 50, 16, torch.float32, seed=1)
    idx, cnt = make_blocks(2, 50, 16, 4, "mixed", seed=1)
    out, ref = run_both(q, k, v, idx, cnt, 16, 4, backend="auto")
    assert torch.equal(out, ref)
    kr, vr = (t.repeat_interleave(2, 0) for t in (k, v))
    sdpa = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert_close(dense_causal_attention(q, k, v), sdpa, torch.float32)


def test_rejects_bad_shapes() -> None:
    q, k, v = make_qkv(6, 4, 32, 16, torch.float32, seed=0)
    idx, cnt = make_blocks(4, 32, 16, 4, "zero", seed=0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_prefill_attention(q, k, v, idx, cnt, segment_size=16, block_size=4)
    q, k, v = make_qkv(4, 2, 32, 16, torch.float32, seed=0)
    idx, cnt = make_blocks(2, 16, 16, 4, "zero", seed=0)  # one segment row, two needed
    with pytest.raises(ValueError, match=r"block_cnt|block_idx"):
        sparse_prefill_attention(q, k, v, idx, cnt, segment_size=16, block_size=4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64), (8, 8, 128)])
def test_gpu_production_tiles(hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    n, seg, b = 2048 + 77, 512, 8
    q, k, v = make_qkv(hq, hkv, n, d, dtype, seed=d)
    idx, cnt = make_blocks(hkv, n, seg, b, "mixed", seed=d)
    out, ref = run_both(q, k, v, idx, cnt, seg, b)
    assert_close(out, ref, dtype)
    kr, vr = (t.repeat_interleave(hq // hkv, 0) for t in (k, v))
    sdpa = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert_close(dense_causal_attention(q, k, v), sdpa, dtype)
