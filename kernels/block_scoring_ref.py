"""Plain-torch reference of entropy profiling (the oracle of `block_scoring`, and its CPU path).

Conventions (those of the EntropyInfer reference code; see the fixture README in
shared/fixtures/entropyinfer_reference):

- One sequence, one layer: ``q [Hq, N, d]``, ``k [Hkv, N, d]``, post-RoPE, KV heads not repeated,
  ``G = Hq // Hkv``; query head ``h`` belongs to KV head ``h // G``.
- ``nseg = ceil(N / S)`` query segments; key blocks of ``b`` tokens cover ``[0, (nseg - 1) * S)`` only, so
  ``nblocks = (nseg - 1) * S // b`` (the last segment's keys are in no block).
- Representations: element-wise max and min over a segment's queries (the last segment may be partial) and
  over a block's keys.
- Logit per query head ``max((qmax.kmax + qmin.kmax) / 2, (qmax.kmin + qmin.kmin) / 2)``, unscaled, then the
  mean over the G query heads of a KV head.
- Segment ``s`` sees blocks ``j < s * S / b``. Softmax in float32 as ``exp(x - max) / sum`` over the visible
  blocks (hidden blocks get probability 0); segment 0 sees nothing and gets the uniform ``1 / nblocks``.
- Entropy ``-sum p * log(p + 1e-9)`` in float32.
- Budget recurrence (`budget_scan_ref`): in float32, in the reference's order of operations.
- Counts (`block_counts_ref`): rigid heads (entropy below e_t in every segment >= 1), budgets (the recurrence,
  or one fixed budget), ``floor(B / b)`` blocks capped by what the segment may see, the dense segments (those
  starting before threshold_len, and the last) marked -1 for the block-sparse kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockCounts",
    "BlockScores",
    "block_counts_ref",
    "block_logits_ref",
    "block_scores_ref",
    "budget_scan_ref",
    "check_qk",
    "count_caps",
    "counts_from_budgets",
    "dense_segment_mask",
    "num_blocks",
    "num_segments",
    "rigid_heads",
    "segment_block_reps_ref",
    "select_blocks_ref",
    "visible_blocks",
]

ENTROPY_EPS = 1e-9  # inside the log of the entropy, as in the reference
RATIO_EPS = 1e-9  # in the denominator of the entropy growth ratio


def num_segments(seq_len: int, segment_size: int) -> int:
    return -(-seq_len // segment_size)


def num_blocks(seq_len: int, segment_size: int, block_size: int) -> int:
    """Key blocks scored: they cover ``[0, (nseg - 1) * S)``."""
    return (num_segments(seq_len, segment_size) - 1) * segment_size // block_size


def visible_blocks(nseg: int, segment_size: int, block_size: int, device: torch.device | str) -> torch.Tensor:
    """int64 ``[nseg]``: blocks segment ``s`` may select, ``s * S / b`` (those that end before it starts)."""
    return torch.arange(nseg, device=device) * (segment_size // block_size)


def check_qk(q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int) -> None:
    """Shape checks shared by the reference and the Triton path (no device sync)."""
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


@dataclass(frozen=True)
class BlockScores:
    """Profiling of one layer.

    ``logits [Hkv, nseg, nblocks]`` float32 block logits (GQA mean); only the visible entries
    ``j < s * S / b`` are defined (the Triton path leaves the others unwritten). ``row_max`` / ``row_sum``
    ``[Hkv, nseg]``: softmax max and normaliser over the visible blocks (0 and 1 where nothing is visible).
    ``entropy [Hkv, nseg]``: float32 nats.
    """

    logits: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    entropy: torch.Tensor
    segment_size: int
    block_size: int

    def probs(self) -> torch.Tensor:
        """float32 ``[Hkv, nseg, nblocks]`` block probabilities, the reference's ``p`` (hidden blocks 0)."""
        _, nseg, nblk = self.logits.shape
        vis = visible_blocks(nseg, self.segment_size, self.block_size, self.logits.device)
        visible = torch.arange(nblk, device=self.logits.device)[None, :] < vis[:, None]
        e = torch.exp(self.logits - self.row_max[..., None]) / self.row_sum[..., None]
        p = torch.where(visible, e, torch.zeros((), device=e.device))
        if nblk:
            p[:, 0, :] = 1.0 / nblk
        return p


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


def block_scores_ref(q: torch.Tensor, k: torch.Tensor, segment_size: int, block_size: int) -> BlockScores:
    """Logits, masked float32 softmax (``exp(x - max) / sum``) and entropy, as the reference computes them."""
    logits = block_logits_ref(q, k, segment_size, block_size)
    hkv, nseg, nblk = logits.shape
    vis = visible_blocks(nseg, segment_size, block_size, logits.device)
    hidden = torch.arange(nblk, device=logits.device)[None, :] >= vis[:, None]
    x = logits.masked_fill(hidden, torch.finfo(torch.float32).min)
    if nblk:
        row_max = x.amax(dim=-1)
        e = torch.exp(x - row_max[..., None])
        row_sum = e.sum(dim=-1)
        p = e / row_sum[..., None]
        entropy = -(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)
        # segment 0 (nothing visible) is uniform in the reference; its statistics are unused
        row_max[:, 0] = 0.0
        row_sum[:, 0] = 1.0
    else:  # one segment: no blocks at all
        row_max = torch.zeros(hkv, nseg, device=logits.device)
        row_sum = torch.ones(hkv, nseg, device=logits.device)
        entropy = torch.zeros(hkv, nseg, device=logits.device)
    return BlockScores(logits, row_max, row_sum, entropy, segment_size, block_size)


def budget_scan_ref(
    entropy: torch.Tensor, rigid: torch.Tensor, base_budget: float, alpha: float, delta: float
) -> torch.Tensor:
    """float32 budgets (tokens) ``[Hkv, nseg]`` from the entropy recurrence; rigid heads get ``base_budget``.

    Dynamic head: ``B[0] = B0``, ``r[1] = delta``,
    ``r[s] = clip((H[s] - H[s-1]) / (H[s-1] + 1e-9), 0, 1 + delta)``,
    ``B[s] = clip(B[s-1] + alpha * B0 * (r[s] - delta), B0, 3 * B0)``, in float32 and in this order.
    """
    h = entropy.float()
    nseg = h.shape[1]
    ratio = torch.zeros_like(h)
    ratio[:, 1:] = (h[:, 1:] - h[:, :-1]) / (h[:, :-1] + RATIO_EPS)
    if nseg > 1:
        ratio[:, 1] = delta
    ratio = ratio.clamp(0.0, 1.0 + delta)
    step = alpha * base_budget
    budgets = torch.empty_like(h)
    budgets[:, 0] = base_budget
    for s in range(1, nseg):
        b = budgets[:, s - 1] + step * (ratio[:, s] - delta)
        budgets[:, s] = b.clamp(base_budget, 3 * base_budget)
    return torch.where(rigid[:, None], torch.full_like(budgets, base_budget), budgets)


def select_blocks_ref(
    scores: torch.Tensor, counts: torch.Tensor, segment_size: int, block_size: int, max_count: int
) -> torch.Tensor:
    """int32 ``[Hkv, nseg, max(max_count, 1)]``: per row the ``counts[h, s]`` visible blocks of highest score,
    ascending, padded with -1. ``counts`` must not exceed the visible blocks nor ``max_count``.

    ``scores`` may be logits or probabilities (same order); entries beyond the visible blocks are ignored.
    """
    hkv, nseg, nblk = scores.shape
    width = max(max_count, 1)
    out = torch.full((hkv, nseg, width), -1, dtype=torch.int32, device=scores.device)
    k = min(max_count, nblk)
    if k == 0:
        return out
    vis = visible_blocks(nseg, segment_size, block_size, scores.device)
    hidden = torch.arange(nblk, device=scores.device)[None, :] >= vis[:, None]
    masked = scores.float().masked_fill(hidden, float("-inf"))
    idx = masked.topk(k, dim=-1, sorted=True).indices  # [Hkv, nseg, k], best first
    keep = torch.arange(k, device=scores.device) < counts[..., None]
    sentinel = torch.iinfo(torch.int64).max
    idx = torch.where(keep, idx, torch.full_like(idx, sentinel)).sort(dim=-1).values
    out[..., :k] = torch.where(idx == sentinel, torch.full_like(idx, -1), idx).to(torch.int32)
    return out


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


def rigid_heads(entropy: torch.Tensor, entropy_threshold: float) -> torch.Tensor:
    """bool ``[Hkv]``: entropy below e_t in every segment >= 1 (segment 0 sees nothing); False if nseg < 2."""
    if entropy.shape[1] < 2:
        return torch.zeros(entropy.shape[0], dtype=torch.bool, device=entropy.device)
    return (entropy[:, 1:] < entropy_threshold).all(dim=1)


def count_caps(seq_len: int, segment_size: int, block_size: int, device: torch.device | str) -> torch.Tensor:
    """int64 ``[nseg]``: blocks segment s may keep, ``min(s*S/b, nblocks - ((N mod S)//b + 1))``, >= 0.

    The second term is the reference's bound (it only binds on the last segment, which runs dense).
    """
    nseg = num_segments(seq_len, segment_size)
    last = num_blocks(seq_len, segment_size, block_size) - ((seq_len % segment_size) // block_size + 1)
    return visible_blocks(nseg, segment_size, block_size, device).clamp(max=last).clamp(min=0)


def counts_from_budgets(budgets: torch.Tensor, caps: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 ``floor(B / b)`` capped by ``caps``, segment 0 set to 0 (float32 division, as the reference)."""
    counts = torch.minimum((budgets.float() / block_size).to(torch.int64), caps[None, :])
    counts[:, 0] = 0
    return counts.to(torch.int32)


def dense_segment_mask(
    seq_len: int, segment_size: int, threshold_len: int, device: torch.device | str
) -> torch.Tensor:
    """bool ``[nseg]``: segments that start before threshold_len, and the last segment."""
    nseg = num_segments(seq_len, segment_size)
    starts = torch.arange(nseg, device=device) * segment_size
    return (starts < threshold_len) | (starts + segment_size >= seq_len)


def block_counts_ref(
    entropy: torch.Tensor,
    *,
    seq_len: int,
    segment_size: int,
    block_size: int,
    threshold_len: int,
    entropy_threshold: float,
    base_budget: float,
    alpha: float,
    delta: float,
    fixed_budget: float | None = None,
) -> BlockCounts:
    """Rigid heads, budgets and block counts from a layer's entropy ``[Hkv, nseg]``.

    Budgets follow the entropy recurrence (`budget_scan_ref`), or are ``fixed_budget`` everywhere when it is
    given (the CritiPrefill baseline; rigid heads are still reported).
    """
    rigid = rigid_heads(entropy, entropy_threshold)
    if fixed_budget is None:
        budgets = budget_scan_ref(entropy, rigid, base_budget, alpha, delta)
    else:
        budgets = torch.full_like(entropy, float(fixed_budget), dtype=torch.float32)
    caps = count_caps(seq_len, segment_size, block_size, entropy.device)
    counts = counts_from_budgets(budgets, caps, block_size)
    dense = dense_segment_mask(seq_len, segment_size, threshold_len, entropy.device)
    kernel_counts = counts.masked_fill(dense[None, :], -1)
    return BlockCounts(rigid, budgets, counts, kernel_counts, dense)
