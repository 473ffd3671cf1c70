"""Observation-window attention scores for KV compression, fused: no ``[H, G, W, S]`` logits in memory.

Semantics: `kernels/window_scores_ref.py` (shapes, positions, what each op returns). Two passes over the
keys, each reading them once:

- `window_lse`: one program per (span of ``KEYS_PER_SPLIT`` keys, KV head) keeps an online max and sum of
  exponentials for each of the head's ``G x W`` queries over its span; torch combines the spans.
- `window_probs`: one program per (``probs_keys`` keys, KV head) recomputes the logits of its key blocks,
  turns them into probabilities with the given log-sum-exp and sums them over the valid window queries.

A program's rows are the ``G x W`` window queries of its KV head (groups folded into one tile of at most
``TILES.rows`` rows). The kernels read keys from a `KeySource`: contiguous ``[rows, S, d]`` here, or
paged, several layers of one sequence through its page table (`kernels/paged_window_scores.py`, what the
engine core's compression uses); `lse_pass` and `probs_pass` launch them for either.

The reference materialises float32 logits of every window query against every key: at 128k keys, 8 KV
heads and a 4 x 32-query window, 512 MB per layer, written and read five times; here the keys are read twice.
`window_scores` chains both passes (a sequence-parallel rank combines its `window_lse` with the other
ranks' before `window_probs`, `shard/parallel/sp_compress.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from entropyinfer.kernels.backend import Backend, jit_kernel, runs_triton
from entropyinfer.kernels.tiling import pow2
from entropyinfer.kernels.window_scores_ref import check_window_args, window_lse_ref, window_probs_ref

__all__ = [
    "TILES",
    "KeySource",
    "Tiles",
    "lse_pass",
    "probs_pass",
    "window_lse",
    "window_probs",
    "window_queries",
    "window_scores",
]


@dataclass
class Tiles:
    """Launch shapes (module-level `TILES`; benchmarks/window_scores.py sweeps them on the GPU)."""

    # the best of results/window_scores.md's sweep at 128k keys (0.54 ms a layer, the reference 7.2 ms);
    # 4 warps beat 8 in every pairing, the other choices moved it by under 5%
    block_s: int = 64  # keys per tile
    keys_per_split: int = 4096  # keys per program of the log-sum-exp pass (a multiple of block_s)
    probs_keys: int = 2048  # keys per program of the probabilities pass (a multiple of block_s)
    rows: int = 128  # query rows (groups x window) per tile
    lse_warps: int = 4
    probs_warps: int = 4


TILES = Tiles()


@triton.jit
def _key_row(
    k_ptr: tl.tensor,
    table_ptr: tl.tensor,
    r: tl.tensor,
    heads: tl.tensor,
    stride_kl: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_t: tl.tensor,
    PAGE_SIZE: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """Where row `r`'s keys start: contiguous keys ``[rows, S, d]`` (PAGE_SIZE 0) at row ``r``; paged ones
    ``[layers, pages, heads, PAGE_SIZE, d]`` of layer ``r // heads``, head ``r % heads`` and that head's page
    table row."""
    if PAGE_SIZE > 0:
        base = k_ptr + (r // heads) * stride_kl + (r % heads) * stride_kh
        t_row = table_ptr + (r % heads) * stride_t
    else:
        base = k_ptr + r * stride_kp
        t_row = table_ptr
    return base, t_row


@triton.jit
def _tile_logits(
    q: tl.tensor,
    k_base: tl.tensor,
    t_row: tl.tensor,
    idx: tl.tensor,
    d: tl.tensor,
    d_ok: tl.tensor,
    count: tl.tensor,
    start: tl.tensor,
    q_pos: tl.tensor,
    scale: tl.tensor,
    stride_kp: tl.tensor,
    stride_ks: tl.tensor,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """Scaled logits ``[rows, BLOCK_S]`` of the window queries `q` against keys `idx` of one head (read
    through its page table when PAGE_SIZE > 0), and which of them a query sees (a valid key at or before
    the query's position)."""
    in_span = idx < count
    if PAGE_SIZE > 0:
        page = tl.load(t_row + idx // PAGE_SIZE, mask=in_span, other=0).to(tl.int64)
        at = k_base + page * stride_kp + (idx % PAGE_SIZE).to(tl.int64) * stride_ks
    else:
        at = k_base + idx.to(tl.int64) * stride_ks
    k = tl.load(at[:, None] + d[None, :], mask=in_span[:, None] & d_ok[None, :])
    x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    seen = in_span[None, :] & ((start + idx)[None, :] <= q_pos[:, None])
    return x, seen


@triton.jit
def _query_rows(
    q_ptr: tl.tensor,
    h: tl.tensor,
    g0: tl.constexpr,
    n_groups: tl.constexpr,
    window: tl.tensor,
    length: tl.tensor,
    d: tl.tensor,
    d_ok: tl.tensor,
    stride_qh: tl.tensor,
    stride_qg: tl.tensor,
    stride_qw: tl.tensor,
    GROUPS: tl.constexpr,
    BLOCK_W: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """The window queries of groups ``g0 .. g0 + GROUPS`` of head `h` as one tile of rows ``GROUPS x
    BLOCK_W``: (q, each row's group, window index, position, whether the row is a real query slot)."""
    r = tl.arange(0, GROUPS * BLOCK_W)
    g, w = g0 + r // BLOCK_W, r % BLOCK_W
    row_ok = (g < n_groups) & (w < window)
    at = q_ptr + h * stride_qh + g[:, None] * stride_qg + w[:, None] * stride_qw + d[None, :]
    q = tl.load(at, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return q, g, w, length - window + w, row_ok


# Triton specialises integer arguments on divisibility by 16, and a compression must not compile mid-decode:
# the sizes that follow a sequence are not specialised on, and every buffer whose strides follow one (the
# page table, the partial sums, the log-sum-exp, the output) is allocated with rows padded to 16 elements,
# so its strides stay multiples of 16 (the loads and stores keep their vector width).
_RUNTIME_INTS = ["heads", "window", "dim"]


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _window_lse_kernel(
    q_ptr: tl.tensor,
    k_ptr: tl.tensor,
    table_ptr: tl.tensor,
    len_ptr: tl.tensor,
    start_ptr: tl.tensor,
    count_ptr: tl.tensor,
    m_ptr: tl.tensor,
    l_ptr: tl.tensor,
    stride_qh: tl.tensor,
    stride_qg: tl.tensor,
    stride_qw: tl.tensor,
    stride_kl: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_ks: tl.tensor,
    stride_t: tl.tensor,
    heads: tl.tensor,
    stride_mh: tl.tensor,
    stride_mg: tl.tensor,
    stride_ms: tl.tensor,
    window: tl.tensor,
    dim: tl.tensor,
    scale: tl.tensor,
    G: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per tile (a power of two)
    BLOCK_W: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KEYS_PER_SPLIT: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    split = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    d_ok = d < dim
    length, start = tl.load(len_ptr + h), tl.load(start_ptr + h)
    count = tl.load(count_ptr + h)
    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, count)
    k_head, t_row = _key_row(k_ptr, table_ptr, h, heads, stride_kl, stride_kp, stride_kh, stride_t, PAGE_SIZE)
    for g0 in tl.static_range(0, G, GROUPS):
        q, g, w, q_pos, row_ok = _query_rows(
            q_ptr, h, g0, G, window, length, d, d_ok, stride_qh, stride_qg, stride_qw, GROUPS, BLOCK_W
        )
        m_i = tl.full([GROUPS * BLOCK_W], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUPS * BLOCK_W], tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            x, seen = _tile_logits(
                q, k_head, t_row, s0 + s, d, d_ok, count, start, q_pos, scale, stride_kp, stride_ks,
                PAGE_SIZE, DOT_PRECISION,
            )  # fmt: skip
            x = tl.where(seen, x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m_i = m_new
        out = h * stride_mh + g * stride_mg + split * stride_ms + w
        tl.store(m_ptr + out, m_i, mask=row_ok)
        tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit(do_not_specialize=[*_RUNTIME_INTS, "n_keys"])
def _window_probs_kernel(
    q_ptr: tl.tensor,
    k_ptr: tl.tensor,
    table_ptr: tl.tensor,
    len_ptr: tl.tensor,
    start_ptr: tl.tensor,
    count_ptr: tl.tensor,
    lse_ptr: tl.tensor,
    out_ptr: tl.tensor,
    stride_qh: tl.tensor,
    stride_qg: tl.tensor,
    stride_qw: tl.tensor,
    stride_kl: tl.tensor,
    stride_kp: tl.tensor,
    stride_kh: tl.tensor,
    stride_ks: tl.tensor,
    stride_t: tl.tensor,
    heads: tl.tensor,
    stride_lh: tl.tensor,
    stride_lg: tl.tensor,
    stride_oh: tl.tensor,
    stride_og: tl.tensor,
    window: tl.tensor,
    dim: tl.tensor,
    n_keys: tl.tensor,
    scale: tl.tensor,
    G: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KEYS_PER_PROGRAM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    h = tl.program_id(1).to(tl.int64)
    lo = tl.program_id(0) * KEYS_PER_PROGRAM
    hi = tl.minimum(lo + KEYS_PER_PROGRAM, n_keys)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    length, start = tl.load(len_ptr + h), tl.load(start_ptr + h)
    count = tl.load(count_ptr + h)
    w_all = tl.arange(0, BLOCK_W)
    n_valid = tl.sum(((w_all < window) & (length - window + w_all >= 0)).to(tl.float32), axis=0)
    per_query = 1.0 / tl.maximum(n_valid, 1.0)
    k_head, t_row = _key_row(k_ptr, table_ptr, h, heads, stride_kl, stride_kp, stride_kh, stride_t, PAGE_SIZE)
    for g0 in tl.static_range(0, G, GROUPS):
        q, g, w, q_pos, row_ok = _query_rows(
            q_ptr, h, g0, G, window, length, d, d_ok, stride_qh, stride_qg, stride_qw, GROUPS, BLOCK_W
        )
        lse = tl.load(lse_ptr + h * stride_lh + g * stride_lg + w, mask=row_ok, other=float("inf"))
        use_q = row_ok & (q_pos >= 0) & (lse < float("inf")) & (lse > float("-inf"))
        shift = tl.where(use_q, lse, 0.0)[:, None]
        gs = g0 + tl.arange(0, GROUPS)
        for s0 in range(lo, hi, BLOCK_S):
            idx = s0 + s
            x, seen = _tile_logits(
                q, k_head, t_row, idx, d, d_ok, count, start, q_pos, scale, stride_kp, stride_ks,
                PAGE_SIZE, DOT_PRECISION,
            )  # fmt: skip
            p = tl.where(seen & use_q[:, None], tl.exp(x - shift), 0.0)
            per_group = tl.sum(tl.reshape(p, [GROUPS, BLOCK_W, BLOCK_S]), axis=1) * per_query  # [GROUPS, S]
            at = out_ptr + h * stride_oh + gs[:, None] * stride_og + idx[None, :]
            tl.store(at, per_group, mask=(gs[:, None] < G) & (idx[None, :] < n_keys))


class KeySource(NamedTuple):
    """Where the kernels read keys (`_key_row`): a tensor, a page table (any tensor when contiguous), its
    strides (layer, page or row, head, slot), the table's row stride, heads per layer, the page size (0:
    contiguous) and the keys a row can hold."""

    k: torch.Tensor
    table: torch.Tensor
    strides: tuple[int, int, int, int]
    stride_t: int
    heads: int
    page_size: int
    n_keys: int

    @classmethod
    def contiguous(cls, keys: torch.Tensor) -> KeySource:
        """Keys ``[rows, S, d]``."""
        k = keys if keys.stride(-1) == 1 else keys.contiguous()
        return cls(k, k, (0, k.stride(0), 0, k.stride(1)), 0, k.shape[0], 0, k.shape[1])

    @classmethod
    def paged(cls, k_pages: torch.Tensor, table: torch.Tensor) -> KeySource:
        """Pools ``[layers, pages, heads, page_size, d]`` (last dim contiguous) read through ``table [heads,
        P]``, copied with its rows padded to 16 entries (its row stride a multiple of 16)."""
        if k_pages.stride(-1) != 1:
            raise ValueError("k_pages needs a contiguous last dim")
        heads, width = table.shape
        padded = torch.zeros(heads, _pad16(width), dtype=table.dtype, device=table.device)
        padded[:, :width] = table
        kp, ps = k_pages.stride(), k_pages.shape[3]
        return cls(k_pages, padded, (kp[0], kp[1], kp[2], kp[3]), padded.stride(0), heads, ps, width * ps)


def _consts(q: torch.Tensor, dtype: torch.dtype) -> dict:
    d = q.shape[3]
    if d < 16 or q.shape[2] > 256:
        raise ValueError(
            f"the kernel needs head_dim >= 16 and a window of at most 256, got {d}, {q.shape[2]}"
        )
    block_w = max(16, pow2(q.shape[2]))
    return dict(
        G=q.shape[1], GROUPS=min(pow2(q.shape[1]), max(1, TILES.rows // block_w)), BLOCK_W=block_w,
        BLOCK_S=TILES.block_s, BLOCK_D=pow2(d), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip


def window_queries(q_obs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = q_obs.to(dtype)
    return q if q.stride(-1) == 1 else q.contiguous()


def lse_pass(
    q: torch.Tensor, src: KeySource, rows: tuple[torch.Tensor, ...], scale: float, keys_per_split: int
) -> torch.Tensor:
    """The log-sum-exp pass over rows ``q [rows, G, W, d]`` (lengths, starts, counts in `rows`)."""
    if keys_per_split <= 0 or keys_per_split % TILES.block_s:
        raise ValueError(
            f"keys_per_split must be a positive multiple of {TILES.block_s}, got {keys_per_split}"
        )
    n, g, w, d = q.shape
    splits = max(1, triton.cdiv(src.n_keys, keys_per_split))
    m = torch.empty(n, g, splits, _pad16(w), dtype=torch.float32, device=q.device)  # strides: 16 x k
    l_sum = torch.empty_like(m)
    if n:
        jit_kernel(_window_lse_kernel, q.device)[(splits, n)](
            q, src.k, src.table, *rows, m, l_sum, q.stride(0), q.stride(1), q.stride(2), *src.strides,
            src.stride_t, src.heads, m.stride(0), m.stride(1), m.stride(2), w, d, scale,
            KEYS_PER_SPLIT=keys_per_split, PAGE_SIZE=src.page_size, num_warps=TILES.lse_warps,
            **_consts(q, src.k.dtype),
        )  # fmt: skip
    m, l_sum = m[..., :w], l_sum[..., :w]
    top = m.amax(dim=2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (l_sum * torch.exp(m - top)).sum(dim=2)
    return torch.where(total > 0, top[:, :, 0] + total.log(), torch.full_like(total, float("-inf")))


def probs_pass(
    q: torch.Tensor, src: KeySource, rows: tuple[torch.Tensor, ...], lse: torch.Tensor, scale: float
) -> torch.Tensor:
    n, g, w, d = q.shape
    if lse.shape != (n, g, w):
        raise ValueError(f"lse must be [H, G, W] = {[n, g, w]}, got {tuple(lse.shape)}")
    padded = torch.zeros(n, g, _pad16(w), dtype=torch.float32, device=q.device)  # strides: 16 x k
    padded[..., :w] = lse
    lse = padded
    s = src.n_keys
    out = torch.empty(n, g, _pad16(s), dtype=torch.float32, device=q.device)[..., :s]
    if s == 0 or n == 0:
        return out
    jit_kernel(_window_probs_kernel, q.device)[(triton.cdiv(s, TILES.probs_keys), n)](
        q, src.k, src.table, *rows, lse, out, q.stride(0), q.stride(1), q.stride(2), *src.strides,
        src.stride_t, src.heads, lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), w, d, s, scale,
        KEYS_PER_PROGRAM=TILES.probs_keys, PAGE_SIZE=src.page_size, num_warps=TILES.probs_warps,
        **_consts(q, src.k.dtype),
    )  # fmt: skip
    return out


def window_lse(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    *,
    starts: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    scale: float | None = None,
    keys_per_split: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """float32 ``[H, G, W]``: each window query's log-sum-exp over the keys it sees (`window_lse_ref`);
    ``keys_per_split``: keys per program, a multiple of ``TILES.block_s`` (default: ``TILES``)."""
    if not runs_triton(keys.device, backend):
        return window_lse_ref(q_obs, keys, lengths, starts=starts, counts=counts, scale=scale)
    rows = check_window_args(q_obs, keys, lengths, starts, counts)
    src = KeySource.contiguous(keys)
    scale = q_obs.shape[3] ** -0.5 if scale is None else scale
    per = TILES.keys_per_split if keys_per_split is None else keys_per_split
    return lse_pass(window_queries(q_obs, src.k.dtype), src, rows, scale, per)


def window_probs(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    lse: torch.Tensor,
    *,
    starts: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """float32 ``[H, G, S]``: the window queries' probabilities of each key given their ``lse``, averaged
    over the valid queries (`window_probs_ref`)."""
    if not runs_triton(keys.device, backend):
        return window_probs_ref(q_obs, keys, lengths, lse, starts=starts, counts=counts, scale=scale)
    rows = check_window_args(q_obs, keys, lengths, starts, counts)
    src = KeySource.contiguous(keys)
    scale = q_obs.shape[3] ** -0.5 if scale is None else scale
    return probs_pass(window_queries(q_obs, src.k.dtype), src, rows, lse, scale)


def window_scores(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """float32 ``[H, G, S]``: `window_lse` then `window_probs` over all of each head's keys."""
    lse = window_lse(q_obs, keys, lengths, scale=scale, backend=backend)
    return window_probs(q_obs, keys, lengths, lse, scale=scale, backend=backend)
