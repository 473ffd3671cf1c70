"""Tests of paged decode attention (`kernels/paged_decode_attention.py`) and its torch reference.

Layout under test: q [B, Hq, d], a page pool k/v_pages [num_pages, Hkv, page_size, d], block tables
[B, Hkv, max_pages] (per KV head, or one table expanded over heads with stride 0) and per-(sequence, KV head)
lengths [B, Hkv]. Each case builds contiguous caches [B, Hkv, L, d], scatters them into random,
non-contiguous pages of a larger pool (the rest of the pool is noise), and checks the paged kernel against
the paged reference and against the contiguous `decode_attention_ref` on the unpaged data. On the CPU,
``backend="triton"`` runs the kernels in the interpreter (float32/float16 only, small shapes).
"""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.backend import interpreter_ready
from entropyinfer.kernels.decode_attention_ref import decode_attention_ref
from entropyinfer.kernels.paged_decode_attention import paged_decode_attention
from entropyinfer.kernels.paged_decode_attention_cpu import paged_decode_attention_cpu
from entropyinfer.kernels.paged_decode_attention_ref import paged_decode_attention_ref
from entropyinfer.kernels.split_k_merge import DecodeWorkspace, get_workspace
from entropyinfer.kernels.tiling import choose_paged_num_splits, sm_count

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}

Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture
def interpret() -> None:
    """Kernels on CPU tensors run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    if not interpreter_ready() and torch.cuda.is_available():
        pytest.skip("triton compiles for the GPU in this process; the gpu tests cover the kernels")


def _paged(
    seed: int,
    lengths: list[list[int]],
    group: int,
    d: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    shared_table: bool = False,
    spare_pages: int = 2,
    device: str = "cpu",
) -> Case:
    """(q, k, v, k_pages, v_pages, block_tables, lengths): contiguous caches k/v [B, Hkv, L, d] and the same
    entries scattered into random pages of a noisy pool. ``shared_table``: one table per sequence,
    expanded over heads with stride 0 (an uncompressed batch). Unused table entries are -1."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int32)
    batch, hkv = lens.shape
    cap = max(int(lens.max()), 1)
    max_pages = -(-cap // page_size) + spare_pages  # spare entries past every head's used pages
    l_max = max_pages * page_size
    q = torch.randn(batch, hkv * group, d, generator=gen)
    k = torch.randn(batch, hkv, l_max, d, generator=gen)
    v = torch.randn(batch, hkv, l_max, d, generator=gen)
    rows = batch if shared_table else batch * hkv
    num_pages = rows * max_pages + 3
    ids = torch.randperm(num_pages, generator=gen)[: rows * max_pages].view(
        -1, 1 if shared_table else hkv, max_pages
    )
    tables = ids.expand(batch, hkv, max_pages) if shared_table else ids
    k_pages = torch.randn(num_pages, hkv, page_size, d, generator=gen)
    v_pages = torch.randn(num_pages, hkv, page_size, d, generator=gen)
    for b in range(batch):
        for h in range(hkv):
            pages = tables[b, h]
            k_pages[pages, h] = k[b, h].view(max_pages, page_size, d)
            v_pages[pages, h] = v[b, h].view(max_pages, page_size, d)
    used = torch.arange(max_pages) < (lens.long().unsqueeze(-1) + page_size - 1) // page_size
    if shared_table:
        tab = ids.clone().int()
        tab[~used.any(dim=1, keepdim=True)] = -1  # -1 past the longest head's pages only
        tables_out = tab.expand(batch, hkv, max_pages)
    else:
        tables_out = ids.masked_fill(~used, -1).int()
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v, k_pages, v_pages)]
    return (*cast, tables_out.to(device), lens.to(device))  # type: ignore[return-value]


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOL[dtype])


# ------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("page_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("shared", [False, True])
def test_reference_matches_contiguous(page_size: int, shared: bool) -> None:
    ps = page_size
    lengths = [[0, 1, ps], [2 * ps, ps + 1, 3 * ps - 1]]
    if shared:  # one table per sequence; heads may still stop at different lengths within it
        lengths = [[0, 1, ps], [2 * ps, 2 * ps, ps + 1]]
    q, k, v, kp, vp, tables, lens = _paged(page_size, lengths, 2, 64, ps, torch.float32, shared_table=shared)
    if shared:
        assert tables.stride(1) == 0
    got = paged_decode_attention_ref(q, kp, vp, tables, lens)
    torch.testing.assert_close(got, decode_attention_ref(q, k, v, lens), atol=1e-6, rtol=1e-6)
    assert torch.all(got[0, :2] == 0)  # length 0: zeros, not NaN
    got2 = paged_decode_attention_ref(q, kp, vp, tables, lens, scale=0.3)
    torch.testing.assert_close(got2, decode_attention_ref(q, k, v, lens, scale=0.3), atol=1e-6, rtol=1e-6)


def test_reference_fp16_dtype_and_int64() -> None:
    q, k, v, kp, vp, tables, lens = _paged(1, [[9, 4]], 4, 128, 8, torch.float16)
    got = paged_decode_attention_ref(q, kp, vp, tables.long(), lens.long())
    assert got.dtype == torch.float16
    _check(got, decode_attention_ref(q, k, v, lens), torch.float16)


# --------------------------------------------------------------------------------- kernel, interpreter

# (group, head_dim, dtype, page_size, num_splits): every page size, d 64/128, groups 1-8, one split (the
# direct write) and several.
KERNEL_CASES = [
    (1, 64, torch.float32, 8, 1),
    (2, 128, torch.float16, 8, 3),
    (4, 64, torch.float16, 16, 2),
    (8, 128, torch.float32, 16, 4),
    (3, 64, torch.float32, 32, 3),
    (1, 128, torch.float16, 32, 1),
    (8, 64, torch.float16, 64, 2),
    (4, 128, torch.float32, 128, 2),
]


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("group", "d", "dtype", "page_size", "num_splits"), KERNEL_CASES)
def test_kernel_matches_references(
    group: int, d: int, dtype: torch.dtype, page_size: int, num_splits: int
) -> None:
    # Per-head lengths: 0, 1, exactly one page, a multiple of pages, and ragged ones; per-head tables.
    ps = page_size
    lengths = [[0, ps, 1], [2 * ps, ps + 3, 3 * ps - 1]]
    q, k, v, kp, vp, tables, lens = _paged(group * 7 + ps, lengths, group, d, ps, dtype)
    out = paged_decode_attention(q, kp, vp, tables, lens, num_splits=num_splits, backend="triton")
    _check(out, paged_decode_attention_ref(q, kp, vp, tables, lens), dtype)
    _check(out, decode_attention_ref(q, k, v, lens), dtype)
    assert torch.all(out[0, :group] == 0)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("length", [1, 16, 48])
def test_kernel_batch_one_full_table(length: int) -> None:
    """B = 1, one KV head of 8 query heads, a table with no spare entry (length 48 fills all 3 pages)."""
    q, k, v, kp, vp, tables, lens = _paged(20 + length, [[length]], 8, 128, 16, torch.float16, spare_pages=0)
    out = paged_decode_attention(q, kp, vp, tables, lens, backend="triton")
    _check(out, decode_attention_ref(q, k, v, lens), torch.float16)


@pytest.mark.usefixtures("interpret")
def test_kernel_large_batch_shared_table_default_splits() -> None:
    """B > 8, one table per sequence expanded over heads (stride 0), default splits and a custom scale."""
    gen = torch.Generator().manual_seed(5)
    lens = torch.randint(0, 50, (10, 1), generator=gen).repeat(1, 2)
    lens[0] = 0
    lens[1] = 16
    lens[2, 1] = 7  # a head of a shared table may stop early
    q, k, v, kp, vp, tables, lens_t = _paged(6, lens.tolist(), 2, 64, 16, torch.float16, shared_table=True)
    assert tables.stride(1) == 0 and not tables.is_contiguous()
    out = paged_decode_attention(q, kp, vp, tables, lens_t, scale=0.2, backend="triton")
    _check(out, decode_attention_ref(q, k, v, lens_t, scale=0.2), torch.float16)
    assert choose_paged_num_splits(10, 2, tables.shape[-1], 16, sm_count(q.device), 64) >= 1


@pytest.mark.usefixtures("interpret")
def test_kernel_strided_pool_views_and_out() -> None:
    """The pool as a view of a [layers, ...] buffer, q / out / lengths as non-contiguous views."""
    q, k, v, kp, vp, tables, lens = _paged(8, [[5, 40], [17, 0]], 4, 64, 16, torch.float32)
    big_k = torch.randn(3, *kp.shape[:3], 64)
    big_v = torch.randn(2, kp.shape[0], kp.shape[1] + 1, kp.shape[2], 64)
    big_k[1] = kp
    big_v[1, :, 1:] = vp
    kp_view, vp_view = big_k[1], big_v[1, :, 1:]
    assert not vp_view.is_contiguous()
    q_big = torch.randn(q.shape[0], q.shape[1], 2 * 64)
    q_big[..., 64:] = q
    q_view = q_big[..., 64:]
    lens_view = lens.t().contiguous().t()
    out_buf = torch.full((q.shape[0], q.shape[1] + 1, 64), 7.0)
    out = out_buf[:, 1:]
    res = paged_decode_attention(
        q_view, kp_view, vp_view, tables, lens_view, num_splits=2, out=out, backend="triton"
    )
    assert res.data_ptr() == out.data_ptr()
    _check(out, decode_attention_ref(q, k, v, lens), torch.float32)
    assert torch.all(out_buf[:, 0] == 7.0)


@pytest.mark.usefixtures("interpret")
def test_kernel_workspace_reuse() -> None:
    """Cached scratch (filled with NaN first) and an own workspace reused across calls with new lengths."""
    q, k, v, kp, vp, tables, _ = _paged(11, [[40, 40], [40, 40]], 2, 64, 8, torch.float16)
    ws = get_workspace(q.device, 2, 4, 64, 6)
    assert get_workspace(q.device, 2, 4, 64, 6) is ws
    ws.mid_o.fill_(float("nan"))
    ws.mid_lse.fill_(float("nan"))
    out = torch.empty_like(q)
    for lens in ([[40, 3], [0, 8]], [[0, 0], [0, 0]], [[1, 39], [24, 17]]):
        lengths = torch.tensor(lens, dtype=torch.int32)
        paged_decode_attention(q, kp, vp, tables, lengths, num_splits=6, out=out, backend="triton")
        _check(out, decode_attention_ref(q, k, v, lengths), torch.float16)
    own = DecodeWorkspace(torch.empty(2, 4, 6, 64), torch.empty(2, 4, 6))
    lengths = torch.tensor([[33, 9], [16, 2]], dtype=torch.int32)
    got = paged_decode_attention(q, kp, vp, tables, lengths, num_splits=6, workspace=own, backend="triton")
    _check(got, decode_attention_ref(q, k, v, lengths), torch.float16)
    with pytest.raises(ValueError, match="workspace shapes"):
        paged_decode_attention(q, kp, vp, tables, lengths, num_splits=3, workspace=own, backend="triton")


def test_cpu_auto_runs_the_in_place_path_and_torch_the_reference() -> None:
    q, _, _, kp, vp, tables, lens = _paged(13, [[16, 0, 5], [1, 2, 3]], 3, 64, 8, torch.float32)
    ref = paged_decode_attention_ref(q, kp, vp, tables, lens)
    torch.testing.assert_close(paged_decode_attention(q, kp, vp, tables, lens), ref, atol=1e-6, rtol=1e-6)
    out = torch.empty_like(q)
    assert paged_decode_attention(q, kp, vp, tables, lens, out=out, backend="torch") is out
    assert torch.equal(out, ref)


@pytest.mark.parametrize("page_size", [8, 16, 128])
@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_cpu_path_matches_reference(page_size: int, spread: bool, shared: bool) -> None:
    """`paged_decode_attention_cpu` (pages read in place, a block from the lowest to the highest page id,
    or only the sequence's pages when they lie far apart): ragged per-head lengths, 0 included, GQA."""
    ps = page_size
    lengths = [[0, 1, ps], [2 * ps, ps + 1, 3 * ps - 1], [5, 5, 5], [0, 0, 0]]
    q, k, v, kp, vp, tables, lens = _paged(
        ps + spread, lengths, 3, 64, ps, torch.float32, shared_table=shared
    )
    if spread:  # sequence 1's pages after its first one move 150 pages away, into a bigger noisy pool
        n = kp.shape[0]
        kp, vp = (
            torch.cat([kp, torch.randn(200, *kp.shape[1:])]),
            torch.cat([vp, torch.randn(200, *vp.shape[1:])]),
        )
        tables = tables.clone()
        for h in range(tables.shape[1]):
            for i in range(1, tables.shape[2]):
                old, new = int(tables[1, h, i]), n + 150 + i
                if old >= 0:
                    kp[new, h], vp[new, h] = kp[old, h], vp[old, h]
                    tables[1, h, i] = new
    got = paged_decode_attention_cpu(q, kp, vp, tables, lens)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, kp, vp, tables, lens), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, decode_attention_ref(q, k, v, lens), atol=1e-5, rtol=1e-5)
    assert torch.all(got[3] == 0) and torch.all(got[0, :3] == 0)
    scaled = paged_decode_attention_cpu(q, kp, vp, tables, lens, scale=0.3)
    torch.testing.assert_close(scaled, decode_attention_ref(q, k, v, lens, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 20, 24, 32])
def test_cpu_path_on_exactly_the_sequences_pages(length: int) -> None:
    """The common uncompressed case: a block that is exactly the sequence's pages (in any order), a partly
    filled or a full last page; and the value checks of the CPU path."""
    gen = torch.Generator().manual_seed(length)
    kp, vp = torch.randn(9, 2, 8, 64, generator=gen), torch.randn(9, 2, 8, 64, generator=gen)
    q = torch.randn(2, 6, 64, generator=gen)
    order = torch.tensor([[5, 3, 4, 6], [1, 2, 0, 7]], dtype=torch.int32)  # 4 pages each, shuffled
    tables = order[:, None, :].expand(2, 2, 4)
    lens = torch.full((2, 2), length, dtype=torch.int32)
    got = paged_decode_attention_cpu(q, kp, vp, tables, lens)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, kp, vp, tables, lens), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="must lie in"):
        paged_decode_attention_cpu(q, kp, vp, tables, lens + 32)
    with pytest.raises(ValueError, match="page ids"):
        paged_decode_attention_cpu(q, kp, vp, tables + 5, lens)


def test_cpu_plan_is_shared_by_layers_and_follows_the_tables_content() -> None:
    """The CPU path plans its gather once per step (`_plan`): calls with equal tables and lengths reuse it,
    a table changed in place, other lengths or another pool get their own (each equal to the reference)."""
    gen = torch.Generator().manual_seed(3)
    kp, vp = torch.randn(12, 2, 8, 64, generator=gen), torch.randn(12, 2, 8, 64, generator=gen)
    q = torch.randn(2, 6, 64, generator=gen)
    tables = torch.tensor([[5, 3, 4], [1, 2, 0]], dtype=torch.int32)[:, None, :].expand(2, 2, 3).contiguous()
    lens = torch.tensor([[20, 20], [9, 17]], dtype=torch.int32)

    def check(kp: torch.Tensor, vp: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> None:
        got = paged_decode_attention_cpu(q, kp, vp, tables, lens)
        ref = paged_decode_attention_ref(q, kp, vp, tables, lens)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)

    check(kp, vp, tables, lens)
    check(kp, vp, tables, lens)  # a second "layer"
    tables[0, 1, 1] = 9  # in place: the same tensor, other pages
    check(kp, vp, tables, lens)
    check(kp, vp, tables, lens - 3)
    check(kp[:10], vp[:10], tables, lens)  # a smaller pool: page 9 is still in range
    with pytest.raises(ValueError, match="page ids"):
        paged_decode_attention_cpu(q, kp[:9], vp[:9], tables, lens)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_validation(backend: str) -> None:
    if backend == "triton" and not interpreter_ready():
        pytest.skip("needs the interpreter")
    q, _, _, kp, vp, tables, lens = _paged(14, [[20, 8]], 2, 64, 8, torch.float32)

    def call(**kw: torch.Tensor) -> None:
        args = dict(q=q, k_pages=kp, v_pages=vp, block_tables=tables, lengths=lens) | kw
        paged_decode_attention(**args, backend=backend)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="lengths must be"):
        call(lengths=lens[:, :1])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        call(q=q[:, :3])
    with pytest.raises(ValueError, match="share a dtype"):
        call(k_pages=kp.half())
    with pytest.raises(ValueError, match="k_pages/v_pages"):
        call(v_pages=vp[:-1])
    with pytest.raises(ValueError, match="power of two"):
        call(k_pages=kp[:, :, :6], v_pages=vp[:, :, :6])
    with pytest.raises(ValueError, match="block_tables must be"):
        call(block_tables=tables[:, 0])
    with pytest.raises(ValueError, match="int32"):
        call(block_tables=tables.float())
    with pytest.raises(ValueError, match="int32"):
        call(lengths=lens.float())
    with pytest.raises(ValueError, match="contiguous last dim"):
        call(k_pages=kp.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="block_tables too short"):
        call(lengths=torch.tensor([[20, 8 * tables.shape[-1] + 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match=">= 0"):
        call(lengths=torch.tensor([[20, -1]], dtype=torch.int32))
    bad = tables.clone()
    bad[0, 1, 0] = kp.shape[0]  # out of the pool, and used by length 8
    with pytest.raises(ValueError, match=r"block_tables\[0, 1, 0\]"):
        call(block_tables=bad)
    bad[0, 1, 0] = -1
    with pytest.raises(ValueError, match="is not a page id"):
        call(block_tables=bad)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, kp, vp, tables, lens, out=torch.empty(1, 4, 32), backend=backend)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- real GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("group", "d", "page_size"), [(1, 128, 16), (4, 128, 8), (3, 64, 32), (8, 64, 128)])
def test_gpu_matches_reference(dtype: torch.dtype, group: int, d: int, page_size: int) -> None:
    lengths = [[0, 1], [1000, 999], [page_size, 513]]
    q, k, v, kp, vp, tables, lens = _paged(200 + group, lengths, group, d, page_size, dtype, device="cuda")
    ref = decode_attention_ref(q, k, v, lens)
    for splits in (None, 1, 7, 32):
        _check(paged_decode_attention(q, kp, vp, tables, lens, num_splits=splits, validate=True), ref, dtype)


@gpu
def test_gpu_cuda_graph_capture() -> None:
    """Capture once, then change lengths, tables and q in place: replays follow them."""
    dtype = torch.bfloat16
    q, _, _, kp, vp, tables, lens = _paged(
        300, [[512] * 4] * 3, 4, 128, 16, dtype, spare_pages=0, device="cuda"
    )
    tables = tables.clone()  # every entry a valid page id: permuting rows keeps them valid
    out = torch.empty_like(q)
    paged_decode_attention(q, kp, vp, tables, lens, out=out)  # warm-up: compile, create the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, kp, vp, tables, lens, out=out)
    gen = torch.Generator().manual_seed(301)
    for _ in range(3):
        lens.copy_(torch.randint(0, 513, lens.shape, generator=gen, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        tables.copy_(tables[..., torch.randperm(tables.shape[-1], generator=gen).to(tables.device)])
        graph.replay()
        torch.cuda.synchronize()
        _check(out, paged_decode_attention_ref(q, kp, vp, tables, lens), dtype)
