"""The segment / block layout that the block-sparse kernels and their references share: geometry, input checks
and the result types of profiling (`BlockScores`) and counts (`BlockCounts`).

Conventions (those of the EntropyInfer reference code; see the fixture README in
shared/fixtures/entropyinfer_reference):

- One sequence, one layer: ``q [Hq, N, d]``, ``k [Hkv, N, d]``, post-RoPE, KV heads not repeated,
  ``G = Hq // Hkv``; query head ``h`` belongs to KV head ``h // G``.
- ``nseg = ceil(N / S)`` query segments, segment ``s`` is ``[s*S, (s+1)*S)``; key blocks of ``b`` tokens
  (block ``j`` covers keys ``[j*b, (j+1)*b)``) are scored over ``[0, (nseg - 1) * S)`` only, so
  ``nblocks = (nseg - 1) * S // b`` (the last segment's keys are in no block).
- Segment ``s`` sees blocks ``j < s * S / b``: those that end before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockCounts",
    "BlockScores",
    "check_chunk_qk",
    "check_qk",
    "check_sparse_prefill_args",
    "last_count_cap",
    "num_blocks",
    "num_segments",
    "visible_blocks",
]


def num_segments(seq_len: int, segment_size: int) -> int:
    """Segments of ``S`` positions covering ``[0, seq_len)``: ``ceil(seq_len / S)``."""
    return -(-seq_len // segment_size)


def num_blocks(seq_len: int, segment_size: int, block_size: int) -> int:
    """Key blocks scored: they cover ``[0, (nseg - 1) * S)``."""
    return (num_segments(seq_len, segment_size) - 1) * segment_size // block_size


def visible_blocks(
    nseg: int, segment_size: int, block_size: int, device: torch.device | str, segment_offset: int = 0
) -> torch.Tensor:
    """int64 ``[nseg]``: blocks segment ``s`` may select, ``s * S / b`` (those that end before it starts), for
    segments ``segment_offset .. segment_offset + nseg - 1``."""
    return torch.arange(segment_offset, segment_offset + nseg, device=device) * (segment_size // block_size)


def last_count_cap(seq_len: int, segment_size: int, block_size: int) -> int:
    """The reference's bound on any segment's block count, ``nblocks - ((N mod S) // b + 1)`` (it only binds
    on the last segment, which runs dense); may be negative."""
    return num_blocks(seq_len, segment_size, block_size) - ((seq_len % segment_size) // block_size + 1)


def check_qk(q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int) -> None:
    """Shape checks of profiling, shared by the reference and the Triton path (no device sync)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be 3-D [H, N, d]; got {tuple(q.shape)} and {tuple(k.shape)}")
    hq, n, d = q.shape
    hkv, nk, dk = k.shape
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads {hq} must be a positive multiple of KV heads {hkv}")
    if nk != n or dk != d:
        raise ValueError(f"k must be [Hkv, {n}, {d}] like q; got {tuple(k.shape)}")
    if n == 0:
        raise ValueError("empty sequence")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device}, {k.device}")
    if segment_size <= 0 or block_size <= 0 or segment_size % block_size:
        raise ValueError(
            f"segment_size {segment_size} must be a positive multiple of block_size {block_size}"
        )


def check_chunk_qk(
    q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int, segment_offset: int, nblocks: int
) -> None:
    """Shape checks of profiling a prefill chunk: ``q [Hq, Nq, d]`` at positions from ``segment_offset * S``,
    ``k [Hkv, Nk, d]`` from position 0 covering every key the chunk's segments see, ``nblocks`` (the logits'
    width) at least the blocks its last segment sees."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be 3-D [H, N, d]; got {tuple(q.shape)} and {tuple(k.shape)}")
    hq, nq, d = q.shape
    hkv, nk, dk = k.shape
    if hkv == 0 or hq % hkv or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need Hq a multiple of Hkv, same d")
    if nq == 0 or segment_offset < 0:
        raise ValueError(f"empty chunk or negative segment_offset ({nq}, {segment_offset})")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device}, {k.device}")
    if segment_size <= 0 or block_size <= 0 or segment_size % block_size:
        raise ValueError(
            f"segment_size {segment_size} must be a positive multiple of block_size {block_size}"
        )
    last_start = (segment_offset + num_segments(nq, segment_size) - 1) * segment_size
    if nk < last_start or nblocks * block_size < last_start:
        raise ValueError(
            f"keys ({nk}) and nblocks * b ({nblocks * block_size}) must cover [0, {last_start}), the keys "
            "the chunk's last segment sees"
        )


def check_sparse_prefill_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    segment_size: int,
    block_size: int,
    q_offset: int,
) -> None:
    """Shape and dtype checks of sparse prefill, shared by the kernel launcher and the reference (no device
    sync). ``q [Hq, Nq, d]`` at positions ``[q_offset, q_offset + Nq)``, ``k``, ``v`` ``[Hkv, Nk, d]``,
    ``block_idx`` int32 ``[Hkv, nseg, max_k]``, ``block_cnt`` int32 ``[Hkv, nseg]`` with
    ``nseg >= num_segments(q_offset + Nq, S)``."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be 3-D [H, N, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    hq, nq, d = q.shape
    hkv, nk, dk = k.shape
    if v.shape != k.shape or dk != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [Hkv, Nk, {d}]")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == block_idx.device == block_cnt.device):
        raise ValueError("q, k, v, block_idx, block_cnt must be on one device")
    if segment_size <= 0 or block_size <= 0:
        raise ValueError(f"segment_size {segment_size} and block_size {block_size} must be positive")
    if q_offset < 0 or nk < q_offset + nq:
        raise ValueError(f"keys must cover [0, q_offset + Nq): Nk={nk}, q_offset={q_offset}, Nq={nq}")
    nseg = num_segments(q_offset + nq, segment_size)
    if block_idx.dtype != torch.int32 or block_cnt.dtype != torch.int32:
        raise ValueError(f"block_idx / block_cnt must be int32; got {block_idx.dtype}, {block_cnt.dtype}")
    if block_idx.dim() != 3 or block_idx.shape[0] != hkv or block_idx.shape[1] < nseg:
        raise ValueError(f"block_idx must be [Hkv={hkv}, nseg>={nseg}, max_k]; got {tuple(block_idx.shape)}")
    if block_cnt.dim() != 2 or block_cnt.shape[0] != hkv or block_cnt.shape[1] < nseg:
        raise ValueError(f"block_cnt must be [Hkv={hkv}, nseg>={nseg}]; got {tuple(block_cnt.shape)}")


@dataclass(frozen=True)
class BlockScores:
    """Profiling of one layer.

    ``logits [Hkv, nseg, nblocks]`` float32 block logits (GQA mean); only the visible entries
    ``j < s * S / b`` are defined (the Triton path leaves the others unwritten). ``row_max`` / ``row_sum``
    ``[Hkv, nseg]``: softmax max and normaliser over the visible blocks (0 and 1 where nothing is visible).
    ``entropy [Hkv, nseg]``: float32 nats. ``spread [Hkv, nseg]``: float32 entropy (nats) of the block
    distribution at a logit scale (the `spread` budget rule's input), when it was asked for; 0 at segment 0.
    ``segment_offset``: the absolute index of row 0 (a prefill chunk's first segment; 0 for a whole prompt):
    row ``i`` is segment ``segment_offset + i`` and sees blocks ``j < (segment_offset + i) * S / b``.
    """

    logits: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    entropy: torch.Tensor
    segment_size: int
    block_size: int
    spread: torch.Tensor | None = None
    segment_offset: int = 0

    def probs(self) -> torch.Tensor:
        """float32 ``[Hkv, nseg, nblocks]`` block probabilities, the reference's ``p`` (hidden blocks 0)."""
        _, nseg, nblk = self.logits.shape
        vis = visible_blocks(
            nseg, self.segment_size, self.block_size, self.logits.device, self.segment_offset
        )
        visible = torch.arange(nblk, device=self.logits.device)[None, :] < vis[:, None]
        e = torch.exp(self.logits - self.row_max[..., None]) / self.row_sum[..., None]
        p = torch.where(visible, e, torch.zeros((), device=e.device))
        if nblk and self.segment_offset == 0:
            p[:, 0, :] = 1.0 / nblk
        return p


@dataclass(frozen=True)
class BlockCounts:
    """How many key blocks each (KV head, segment) of one layer keeps.

    rigid: bool ``[Hkv]``; budgets: float32 ``[Hkv, nseg]`` tokens before the caps; counts: int32
    ``[Hkv, nseg]`` with ``counts[:, 0] == 0``; kernel_counts: int32, the counts with -1 on dense segments
    (the form `kernels.sparse_prefill` takes); dense_segments: bool ``[nseg]``.
    """

    rigid: torch.Tensor
    budgets: torch.Tensor
    counts: torch.Tensor
    kernel_counts: torch.Tensor
    dense_segments: torch.Tensor
