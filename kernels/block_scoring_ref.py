"""Plain-torch reference of entropy profiling (the oracle of `block_scoring`, and its CPU path).

Layout: `block_layout` (segments of ``S`` queries, key blocks of ``b`` keys, visible blocks). The computation:

- Representations: element-wise max and min over a segment's queries (the last segment may be partial) and
  over a block's keys.
- Logit per query head ``max((qmax.kmax + qmin.kmax) / 2, (qmax.kmin + qmin.kmin) / 2)``, unscaled, then the
  mean over the G query heads of a KV head.
- Segment ``s`` sees blocks ``j < s * S / b``. Softmax in float32 as ``exp(x - max) / sum`` over the visible
  blocks (hidden blocks get probability 0); segment 0 sees nothing and gets the uniform ``1 / nblocks``.
- Entropy ``-sum p * log(p + 1e-9)`` in float32.
- A prefill chunk (``segment_offset > 0``): the chunk's query segments ``segment_offset ..`` against the key
  blocks before each of them, in logits ``num_key_blocks`` wide (the whole prompt's, so each row is reduced
  exactly as in a one-shot profiling). ``row_invariant`` computes the logits one segment at a time (every
  matrix product has one query row), so a segment's numbers do not depend on how many segments are scored
  with it: chunked and one-shot profiling agree bit for bit (CPU BLAS results change with the row count).
- Spread entropy (`spread_entropy_ref`, for the `spread` budget rule): the entropy of ``softmax(t * x)`` over
  the visible blocks at a logit scale ``t``, as ``y = t * (x - max)``, ``z = sum exp(y)``,
  ``H = log z - sum exp(y) * y / z`` (no epsilon; 0 where nothing is visible).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from entropyinfer.kernels.block_layout import (
    BlockScores,
    check_chunk_qk,
    check_qk,
    num_blocks,
    num_segments,
    visible_blocks,
)

__all__ = [
    "ENTROPY_EPS",
    "block_logits_ref",
    "block_scores_ref",
    "chunk_block_logits_ref",
    "segment_block_reps_ref",
    "spread_entropy_ref",
]

ENTROPY_EPS = 1e-9  # inside the log of the entropy, as in the reference


def segment_block_reps_ref(
    q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qmax, qmin [Hq, nseg, d]`` and ``kmax, kmin [Hkv, nblocks, d]`` in the inputs' dtype."""
    hq, n, d = q.shape
    nseg = num_segments(n, segment_size)
    nblk = num_blocks(n, segment_size, block_size)
    full = (nseg - 1) * segment_size
    qs = q[:, :full].reshape(hq, nseg - 1, segment_size, d)
    last = q[:, full:]
    qmax = torch.cat([qs.amax(dim=2), last.amax(dim=1, keepdim=True)], dim=1)
    qmin = torch.cat([qs.amin(dim=2), last.amin(dim=1, keepdim=True)], dim=1)
    kb = k[:, :full].reshape(k.shape[0], nblk, block_size, d)
    return qmax, qmin, kb.amax(dim=2), kb.amin(dim=2)


def block_logits_ref(q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int) -> torch.Tensor:
    """float32 ``[Hkv, nseg, nblocks]``, every entry (no causal mask)."""
    check_qk(q, k, segment_size, block_size)
    hq, hkv = q.shape[0], k.shape[0]
    qmax, qmin, kmax, kmin = (t.float() for t in segment_block_reps_ref(q, k, segment_size, block_size))
    g = hq // hkv
    nseg = qmax.shape[1]
    kmax = kmax.repeat_interleave(g, dim=0)
    kmin = kmin.repeat_interleave(g, dim=0)
    hi = (qmax @ kmax.transpose(1, 2) + qmin @ kmax.transpose(1, 2)) / 2
    lo = (qmax @ kmin.transpose(1, 2) + qmin @ kmin.transpose(1, 2)) / 2
    return torch.maximum(hi, lo).view(hkv, g, nseg, -1).mean(dim=1)


def chunk_block_logits_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    segment_offset: int,
    num_key_blocks: int,
    row_invariant: bool = True,
    key_reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 ``[Hkv, nseg_chunk, num_key_blocks]`` logits of a chunk's segments (``q`` from position
    ``segment_offset * S``) against the key blocks of ``k`` (from position 0); blocks the chunk's segments
    cannot see are 0 (and hidden). ``key_reps``: the blocks' ``(kmax, kmin) [Hkv, >= visible blocks, d]``
    computed elsewhere (`paged_block_reps`), so ``k``'s values are never read (only its shape)."""
    check_chunk_qk(q, k, segment_size, block_size, segment_offset, num_key_blocks)
    hq, nq, d = q.shape
    hkv = k.shape[0]
    g, s_len, b = hq // hkv, segment_size, block_size
    nseg = num_segments(nq, s_len)
    full = (nseg - 1) * s_len
    qs = q[:, :full].reshape(hq, nseg - 1, s_len, d)
    qmax = torch.cat([qs.amax(dim=2), q[:, full:].amax(dim=1, keepdim=True)], dim=1).float()
    qmin = torch.cat([qs.amin(dim=2), q[:, full:].amin(dim=1, keepdim=True)], dim=1).float()
    avail = (segment_offset + nseg - 1) * s_len // b  # blocks the last segment sees
    kmax = q.new_zeros(hkv, num_key_blocks, d, dtype=torch.float32)
    kmin = torch.zeros_like(kmax)
    if key_reps is None:
        kb = k[:, : avail * b].reshape(hkv, avail, b, d)
        kmax[:, :avail], kmin[:, :avail] = kb.amax(dim=2).float(), kb.amin(dim=2).float()
    else:
        kmax[:, :avail], kmin[:, :avail] = key_reps[0][:, :avail].float(), key_reps[1][:, :avail].float()
    kmax_t = kmax.repeat_interleave(g, dim=0).transpose(1, 2)
    kmin_t = kmin.repeat_interleave(g, dim=0).transpose(1, 2)

    def logits(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hi = (a @ kmax_t + c @ kmax_t) / 2
        lo = (a @ kmin_t + c @ kmin_t) / 2
        return torch.maximum(hi, lo)

    if row_invariant:
        out = torch.cat([logits(qmax[:, i : i + 1], qmin[:, i : i + 1]) for i in range(nseg)], dim=1)
    else:
        out = logits(qmax, qmin)
    return out.view(hkv, g, nseg, -1).mean(dim=1)


def spread_entropy_ref(
    logits: torch.Tensor, segment_size: int, block_size: int, logit_scale: float, segment_offset: int = 0
) -> torch.Tensor:
    """float32 ``[Hkv, nseg]``: entropy (nats) of ``softmax(logit_scale * logits)`` over each segment's
    visible blocks (``logit_scale >= 0``); 0 where nothing is visible. Entries beyond them are ignored.
    Row ``i`` is segment ``segment_offset + i``."""
    hkv, nseg, nblk = logits.shape
    if nblk == 0:
        return torch.zeros(hkv, nseg, dtype=torch.float32, device=logits.device)
    vis = visible_blocks(nseg, segment_size, block_size, logits.device, segment_offset)
    visible = torch.arange(nblk, device=logits.device)[None, :] < vis[:, None]
    x = logits.float().masked_fill(~visible, float("-inf"))
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(vis[None, :, None] > 0, m, torch.zeros_like(m))
    y = torch.where(visible, (x - m) * float(logit_scale), torch.zeros_like(x))
    e = torch.where(visible, torch.exp(y), torch.zeros_like(x))
    z = e.sum(dim=-1)
    zs = torch.where(z > 0, z, torch.ones_like(z))
    h = torch.log(zs) - (e * y).sum(dim=-1) / zs
    return torch.where(vis[None, :] > 0, h, torch.zeros_like(h))


def block_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    segment_size: int,
    block_size: int,
    spread_logit_scale: float | None = None,
    *,
    segment_offset: int = 0,
    num_key_blocks: int | None = None,
    row_invariant: bool = False,
    logit_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    key_reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BlockScores:
    """Logits, masked float32 softmax (``exp(x - max) / sum``) and entropy, as the reference computes them;
    with `spread_logit_scale`, also the spread entropy (`spread_entropy_ref`).

    The whole prompt by default (``q``, ``k`` of one length). A prefill chunk, or any row-invariant profiling,
    with `segment_offset` / `num_key_blocks` / `row_invariant` (`chunk_block_logits_ref`): ``q`` holds the
    positions from ``segment_offset * S``, ``k`` the keys from 0 (at least up to the chunk's last segment)."""
    chunked = segment_offset > 0 or num_key_blocks is not None or row_invariant or key_reps is not None
    if chunked:
        nblk_all = num_key_blocks
        if nblk_all is None:
            nblk_all = (
                (segment_offset + num_segments(q.shape[1], segment_size) - 1) * segment_size // block_size
            )
        logits = chunk_block_logits_ref(
            q, k, segment_size, block_size, segment_offset, nblk_all, row_invariant=row_invariant,
            key_reps=key_reps,
        )  # fmt: skip
    else:
        logits = block_logits_ref(q, k, segment_size, block_size)
    if logit_reduce is not None:  # a rank's partial GQA group made the whole group's (`block_scoring.py`)
        logits = logit_reduce(logits)
    hkv, nseg, nblk = logits.shape
    vis = visible_blocks(nseg, segment_size, block_size, logits.device, segment_offset)
    hidden = torch.arange(nblk, device=logits.device)[None, :] >= vis[:, None]
    x = logits.masked_fill(hidden, torch.finfo(torch.float32).min)
    if nblk:
        row_max = x.amax(dim=-1)
        e = torch.exp(x - row_max[..., None])
        row_sum = e.sum(dim=-1)
        p = e / row_sum[..., None]
        entropy = -(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)
        if segment_offset == 0:
            # segment 0 (nothing visible) is uniform in the reference; its statistics are unused
            row_max[:, 0] = 0.0
            row_sum[:, 0] = 1.0
    else:  # one segment: no blocks at all
        row_max = torch.zeros(hkv, nseg, device=logits.device)
        row_sum = torch.ones(hkv, nseg, device=logits.device)
        entropy = torch.zeros(hkv, nseg, device=logits.device)
    spread = (
        None
        if spread_logit_scale is None
        else spread_entropy_ref(logits, segment_size, block_size, spread_logit_scale, segment_offset)
    )
    return BlockScores(logits, row_max, row_sum, entropy, segment_size, block_size, spread, segment_offset)
