"""Segment-wise sparse prefill decisions for one layer: the `entropy` (EntropyInfer) and `fixed`
(CritiPrefill) policies.

Profiling (`kernels.block_scoring`), then counts and selection (`kernels.block_selection`: rigid / dynamic
heads, budget recurrence, block counts, top blocks per (KV head, segment)). The result, a `LayerPlan`, is
what the block-sparse prefill kernel consumes: per (KV head, segment) a count and an ascending list of
``block_size``-token key blocks; segments marked dense attend every key before them. Every segment also
attends its own keys causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropyinfer.kernels.backend import Backend, runs_triton
from entropyinfer.kernels.block_layout import BlockCounts, BlockScores, num_blocks, num_segments
from entropyinfer.kernels.block_scoring import LogitReduce, block_scores
from entropyinfer.kernels.block_selection import block_counts, select_blocks
from entropyinfer.kernels.block_selection_ref import (
    count_caps,
    counts_from_budgets,
    rigid_heads,
    spread_budgets_ref,
)
from entropyinfer.kernels.query_ranking import query_block_scores
from entropyinfer.kernels.tiling import scoring_tiles, select_tiles
from entropyinfer.policies.budgets import coverage_budgets, spread_logit_scale, spread_rule
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.head_scaling import captured_mass, max_scale, scaled_counts
from entropyinfer.policies.registry import SELECTIONS, Selection

__all__ = [
    "ChunkPlan",
    "LayerPlan",
    "plan_chunk",
    "plan_density",
    "plan_density_tensor",
    "plan_from_scores",
    "plan_layer",
    "rank_blocks",
]


@dataclass(frozen=True)
class LayerPlan:
    """Sparse prefill plan of one layer (one sequence). Tensors live on the inputs' device.

    entropy: float32 ``[Hkv, nseg]`` block-attention entropy (nats) per KV head and query segment.
    rigid: bool ``[Hkv]`` heads whose entropy stays below e_t in every segment >= 1 (False with one segment).
    budgets: float32 ``[Hkv, nseg]`` budgets in tokens before the caps.
    counts: int32 ``[Hkv, nseg]`` blocks kept per (KV head, segment); in reference mode every row is the max
        over KV heads. ``counts[:, 0] == 0``.
    kernel_counts: int32 ``[Hkv, nseg]``: the counts with -1 on dense segments, what `kernels.sparse_prefill`
        takes.
    block_idx: int32 ``[Hkv, nseg, max_count]`` (``max_count >= 1``): the selected block ids, ascending in the
        first ``counts[h, s]`` entries, -1 after.
    dense_segments: bool ``[nseg]`` segments that attend every earlier key (those starting before
        threshold_len, and the last).
    probs: float32 ``[Hkv, nseg, nblocks]`` block probabilities, only when asked for (tests, analysis).
    spread: float32 ``[Hkv, nseg]`` the spread entropy the counts came from (mode `spread` only); there
        ``rigid`` is the rigid-so-far test of the last segment, at the spread scale.
    """

    entropy: torch.Tensor
    rigid: torch.Tensor
    budgets: torch.Tensor
    counts: torch.Tensor
    kernel_counts: torch.Tensor
    block_idx: torch.Tensor
    dense_segments: torch.Tensor
    seq_len: int
    segment_size: int
    block_size: int
    probs: torch.Tensor | None = None
    spread: torch.Tensor | None = None
    captured: torch.Tensor | None = None  # with_mass: float32 [Hkv, nseg] (`policies.head_scaling`)

    @property
    def num_segments(self) -> int:
        return self.counts.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.counts.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the causal QK work computed (see `plan_density`); syncs with the device."""
        return plan_density(
            self.counts, self.dense_segments, self.seq_len, self.segment_size, self.block_size
        )


def plan_density_tensor(
    counts: torch.Tensor, dense_segments: torch.Tensor, seq_len: int, segment_size: int, block_size: int
) -> torch.Tensor:
    """`plan_density` as a float64 0-dim tensor on the counts' device (no device sync)."""
    s_len, n = segment_size, seq_len
    nseg = counts.shape[1]
    start = torch.arange(nseg, device=counts.device, dtype=torch.float64) * s_len
    end = (start + s_len).clamp(max=n)
    dense_work = (end * (end + 1) - start * (start + 1)) / 2  # sum_{i=start}^{end-1} (i + 1)
    sparse_work = s_len * counts.double() * block_size + s_len * (s_len + 1) / 2
    work = torch.where(dense_segments[None, :], dense_work[None, :], sparse_work)
    total = counts.shape[0] * n * (n + 1) / 2
    return work.sum() / total


def plan_density(
    counts: torch.Tensor, dense_segments: torch.Tensor, seq_len: int, segment_size: int, block_size: int
) -> float:
    """Causal QK work of the plan over that of dense causal attention, averaged over KV heads.

    A sparse segment (always full: the last one is dense) costs ``S * count * b`` for its blocks plus
    ``S (S + 1) / 2`` inside itself; a dense segment ``s`` costs ``sum_i (i + 1)`` over its queries.
    """
    return float(plan_density_tensor(counts, dense_segments, seq_len, segment_size, block_size).item())


def plan_from_scores(
    scores: BlockScores,
    cfg: SparsePrefillConfig,
    seq_len: int,
    *,
    policy: Selection = "entropy",
    backend: Backend = "auto",
    with_probs: bool = False,
    head_scale: torch.Tensor | None = None,
    head_dim: int | None = None,
    logit_dim: int | None = None,
    ranking: torch.Tensor | None = None,
) -> LayerPlan:
    """Budgets, counts and block selection from a layer's profiling (see `plan_layer`). ``head_dim``: return
    the captured mass at that temperature; ``logit_dim``: the queries' head size (mode `coverage`);
    ``ranking``: the order blocks are taken in (`ranking: queries`, `rank_blocks`; None: the block logits)."""
    if policy not in SELECTIONS:
        raise ValueError(f"unknown block-selection rule {policy!r}; choose one of: {', '.join(SELECTIONS)}")
    s_len, b = cfg.segment_size, cfg.block_size
    if scores.segment_size != s_len or scores.block_size != b:
        raise ValueError(
            f"scores were computed with S={scores.segment_size}, b={scores.block_size}; "
            f"the config has S={s_len}, b={b}"
        )
    entropy = scores.entropy
    spread = policy == "entropy" and cfg.mode == "spread"
    if spread and scores.spread is None:
        raise ValueError(
            "mode 'spread' needs the spread entropy: score with spread_logit_scale (plan_layer does)"
        )
    bc = _block_counts(
        scores.spread if spread and scores.spread is not None else entropy, cfg, seq_len, policy, backend
    )
    if policy == "entropy" and cfg.mode == "coverage":
        bc = _with_budgets(bc, coverage_budgets(scores.logits, cfg, _head_dim(logit_dim)), cfg, seq_len)
    counts, kernel_counts = bc.counts, bc.kernel_counts
    scale = head_scale if policy == "entropy" else None
    if scale is not None:  # the policy actor's per-head factors (`policies/head_scaling.py`)
        counts, kernel_counts = scaled_counts(
            bc.budgets, scale, bc.dense_segments, seq_len=seq_len, segment_size=s_len, block_size=b
        )
    if cfg.mode == "reference":
        counts = counts.amax(dim=0, keepdim=True).expand_as(counts).contiguous()
        kernel_counts = counts.masked_fill(bc.dense_segments[None, :], -1)
    # a static bound on the counts: no device sync to size block_idx
    max_budget = cfg.max_budget if policy == "entropy" else cfg.fixed_budget
    nseg = entropy.shape[1]
    max_count = min(int(max_budget * max_scale(scale)) // b, max((nseg - 1) * (s_len // b), 0))
    order = scores.logits if ranking is None else ranking
    block_idx = select_blocks(order, counts, s_len, b, max_count, backend=backend)
    captured = None
    if head_dim is not None:
        captured = captured_mass(
            scores.logits, block_idx, counts, bc.dense_segments, segment_size=s_len, block_size=b,
            head_dim=head_dim,
        )  # fmt: skip
    return LayerPlan(
        entropy=entropy,
        rigid=bc.rigid,
        budgets=bc.budgets,
        counts=counts,
        kernel_counts=kernel_counts,
        block_idx=block_idx,
        dense_segments=bc.dense_segments,
        seq_len=seq_len,
        segment_size=s_len,
        block_size=b,
        probs=scores.probs() if with_probs else None,
        spread=scores.spread if spread else None,
        captured=captured,
    )


def plan_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: SparsePrefillConfig,
    *,
    policy: Selection = "entropy",
    backend: Backend = "auto",
    with_probs: bool = False,
    head_scale: torch.Tensor | None = None,
    with_mass: bool = False,
    logit_reduce: LogitReduce | None = None,
    rank_reduce: LogitReduce | None = None,
) -> LayerPlan:
    """Profile one layer and decide its sparse prefill.

    Args:
        q: ``[Hq, N, d]`` post-RoPE queries of one sequence.
        k: ``[Hkv, N, d]`` post-RoPE keys (KV heads not repeated).
        cfg: segment / block sizes, budgets, mode (`per_head`, `reference`, `causal` (per_head with the
            rigid-so-far test), or the causal `spread` / `coverage` rules of `policies/budgets.py`).
        policy: ``entropy`` (budgets from the entropy recurrence) or ``fixed`` (``cfg.fixed_budget``
            everywhere).
        backend: ``triton`` (compiled on GPU, interpreted on CPU), ``torch`` (the reference), or ``auto``
            (Triton for CUDA tensors, else torch); see `kernels.backend`.
        with_probs: also return the block probabilities (``LayerPlan.probs``).
        head_scale: float32 ``[Hkv]`` budget factors of the entropy rule (the policy actor's table row;
            None: the rule's own budgets, bit for bit).
        with_mass: also return the captured-mass proxy (``LayerPlan.captured``, `policies.head_scaling`).
        logit_reduce: makes a tensor-parallel rank's block logits (part of a GQA group's query heads) the
            whole group's (`kernels.block_scoring.LogitReduce`), so the replicas of a KV head decide alike.
        rank_reduce: the same for the query-ranking scores (`ranking: queries`; a max over the replicas).
    """
    scale = spread_logit_scale(cfg, q.shape[-1]) if policy == "entropy" and cfg.mode == "spread" else None
    scores = block_scores(
        q, k, cfg.segment_size, cfg.block_size, backend=backend, spread_logit_scale=scale,
        logit_reduce=logit_reduce,
    )  # fmt: skip
    ranking = rank_blocks(
        q, k, cfg, scores.logits.shape[2], backend=backend, rank_reduce=rank_reduce, logit_reduce=logit_reduce
    )
    return plan_from_scores(
        scores, cfg, q.shape[1], policy=policy, backend=backend, with_probs=with_probs,
        head_scale=head_scale, head_dim=q.shape[-1] if with_mass else None, logit_dim=q.shape[-1],
        ranking=ranking,
    )  # fmt: skip


def rank_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: SparsePrefillConfig,
    num_key_blocks: int,
    *,
    segment_offset: int = 0,
    key_pages: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: Backend = "auto",
    rank_reduce: LogitReduce | None = None,
    logit_reduce: LogitReduce | None = None,
    seq_len: int | None = None,
) -> torch.Tensor | None:
    """The order in which `select_blocks` takes a segment's blocks: None for `ranking: box` (the block
    logits) or when no segment of the chunk is sparse (of a ``seq_len``-token prompt: each starts before
    threshold_len or is the last; host arithmetic), else the query-ranking scores ``[Hkv, nseg_chunk,
    num_key_blocks]`` (`kernels.query_ranking`) of ``q`` (from ``segment_offset * S``) against ``k`` (from
    0), or the keys read through ``key_pages`` (``k_pages``, ``block_table``) when given. A tensor-parallel
    replica (``logit_reduce`` set) needs ``rank_reduce`` too, or the replicas would pick different blocks."""
    if cfg.ranking == "box":
        return None
    if logit_reduce is not None and rank_reduce is None:
        raise ValueError("ranking 'queries' on a KV-head replica needs rank_reduce (a max over the replicas)")
    s_len, n = cfg.segment_size, q.shape[1] if seq_len is None else seq_len
    first, count = segment_offset, num_segments(q.shape[1], s_len)
    if all(s * s_len < cfg.threshold_len or (s + 1) * s_len >= n for s in range(first, first + count)):
        return None
    keys, table = key_pages if key_pages is not None else (k, None)
    out = query_block_scores(
        q, keys, cfg.segment_size, cfg.block_size, cfg.ranking_stride, segment_offset=segment_offset,
        num_key_blocks=num_key_blocks, block_table=table, backend=backend,
    )  # fmt: skip
    return out if rank_reduce is None else rank_reduce(out)


@dataclass(frozen=True)
class ChunkPlan:
    """Sparse prefill plan of one prefill chunk of one layer: the chunk's segments ``segment_offset ..
    segment_offset + nseg_chunk - 1`` of a ``seq_len``-token prompt (causal modes and `fixed` only).

    entropy / spread: float32 ``[Hkv, nseg_chunk]`` the chunk's profiling (spread: mode `spread` only).
    counts / kernel_counts / block_idx: as `LayerPlan`, the chunk's rows (block ids absolute).
    rigid: bool ``[Hkv]`` rigid so far at the chunk's last segment (the whole-prompt test after the last
        chunk).
    dense_segments: bool ``[nseg]`` of the whole prompt.
    """

    entropy: torch.Tensor
    spread: torch.Tensor | None
    counts: torch.Tensor
    kernel_counts: torch.Tensor
    block_idx: torch.Tensor
    rigid: torch.Tensor
    dense_segments: torch.Tensor
    segment_offset: int
    captured: torch.Tensor | None = None  # with_mass: float32 [Hkv, nseg_chunk] (`policies.head_scaling`)


def plan_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: SparsePrefillConfig,
    *,
    seq_len: int,
    segment_offset: int,
    entropy_before: torch.Tensor,
    spread_before: torch.Tensor | None = None,
    policy: Selection = "entropy",
    backend: Backend = "auto",
    head_scale: torch.Tensor | None = None,
    with_mass: bool = False,
    logit_reduce: LogitReduce | None = None,
    key_reps: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_pages: tuple[torch.Tensor, torch.Tensor] | None = None,
    rank_reduce: LogitReduce | None = None,
) -> ChunkPlan:
    """Profile one prefill chunk of one layer and decide its blocks exactly as a one-shot prefill would.

    ``q [Hq, Nq, d]`` positions from ``segment_offset * S`` (whole segments, but the prompt's last), ``k
    [Hkv, Nk, d]`` keys from position 0 (``Nk >= q's last position``); ``entropy_before`` / ``spread_before``
    float32 ``[Hkv, segment_offset]``: this layer's profiling of the earlier segments (the causal rules read
    them; `fixed` ignores them). Row-invariant scoring with the whole prompt's block count as the logits'
    width and the whole prompt's tiles, then the counts of the whole-prompt rule over the history (later
    segments padded: the rule is causal, they change nothing before them), so a chunked prefill gives the
    one-shot counts (bit for bit on the torch path). ``logit_reduce``: as `plan_layer`. ``key_reps``: the
    key blocks' ``(kmax, kmin)`` read from paged KV (`kernels.paged_block_reps`); ``k`` is then only a shape,
    and ``key_pages`` (``k_pages``, ``block_table``) gives `ranking: queries` the keys themselves.
    """
    if policy == "entropy" and not cfg.causal:
        raise ValueError(f"mode {cfg.mode!r} is not causal: prefill it in one shot (plan_layer)")
    s_len, b = cfg.segment_size, cfg.block_size
    nseg, nblk = num_segments(seq_len, s_len), num_blocks(seq_len, s_len, b)
    spread = policy == "entropy" and cfg.mode == "spread"
    cuda = q.device.type == "cuda"
    on_triton = runs_triton(q.device, backend)
    scores = block_scores(
        q, k, s_len, b, backend=backend, segment_offset=segment_offset, num_key_blocks=nblk,
        spread_logit_scale=spread_logit_scale(cfg, q.shape[-1]) if spread else None, row_invariant=True,
        tiles=scoring_tiles(nseg, nblk, s_len, b, q.shape[-1], cuda=cuda) if on_triton else None,
        logit_reduce=logit_reduce,
        key_reps=key_reps,
    )  # fmt: skip
    nc = scores.entropy.shape[1]
    end = segment_offset + nc
    source = scores.spread if spread and scores.spread is not None else scores.entropy
    before = spread_before if spread else entropy_before
    if before is None or before.shape[1] != segment_offset:
        raise ValueError(f"need this layer's history of the {segment_offset} earlier segments")
    history = source.new_zeros(source.shape[0], nseg)
    history[:, :segment_offset] = before
    history[:, segment_offset:end] = source
    bc = _block_counts(history, cfg, seq_len, policy, backend)
    if policy == "entropy" and cfg.mode == "coverage":
        budgets = history.new_zeros(history.shape)
        budgets[:, segment_offset:end] = coverage_budgets(scores.logits, cfg, q.shape[-1], segment_offset)
        bc = _with_budgets(bc, budgets, cfg, seq_len)
    # rigid so far at the chunk's last segment: the rule's test on the history so far
    rigid = _rigid_so_far(history[:, :end], cfg, spread) if end < nseg else bc.rigid
    scale = head_scale if policy == "entropy" else None
    all_kernel_counts = bc.kernel_counts
    all_counts = bc.counts
    if scale is not None:  # the policy actor's per-head factors (`policies/head_scaling.py`)
        all_counts, all_kernel_counts = scaled_counts(
            bc.budgets, scale, bc.dense_segments, seq_len=seq_len, segment_size=s_len, block_size=b
        )
    counts = all_counts[:, segment_offset:end].contiguous()
    max_budget = cfg.max_budget if policy == "entropy" else cfg.fixed_budget
    max_count = min(int(max_budget * max_scale(scale)) // b, max((nseg - 1) * (s_len // b), 0))
    tiles = select_tiles(nseg, nblk, cuda=cuda) if on_triton else None
    ranking = rank_blocks(
        q, k, cfg, nblk, segment_offset=segment_offset, key_pages=key_pages, backend=backend,
        rank_reduce=rank_reduce, logit_reduce=logit_reduce, seq_len=seq_len,
    )  # fmt: skip
    block_idx = select_blocks(
        scores.logits if ranking is None else ranking,
        counts,
        s_len,
        b,
        max_count,
        backend=backend,
        tiles=tiles,
        segment_offset=segment_offset,
    )
    captured = None
    if with_mass:
        captured = captured_mass(
            scores.logits, block_idx, counts, bc.dense_segments, segment_size=s_len, block_size=b,
            head_dim=q.shape[-1], segment_offset=segment_offset,
        )  # fmt: skip
    return ChunkPlan(
        entropy=scores.entropy,
        spread=scores.spread if spread else None,
        counts=counts,
        kernel_counts=all_kernel_counts[:, segment_offset:end].contiguous(),
        block_idx=block_idx,
        rigid=rigid,
        dense_segments=bc.dense_segments,
        segment_offset=segment_offset,
        captured=captured,
    )


def _rigid_so_far(history: torch.Tensor, cfg: SparsePrefillConfig, spread: bool) -> torch.Tensor:
    """bool ``[Hkv]``: the rule's rigid test over ``history [Hkv, segments]`` (torch; a few elements)."""
    if spread:
        return spread_budgets_ref(history, cfg.segment_size, cfg.block_size, spread_rule(cfg))[0][:, -1]
    return rigid_heads(history, cfg.entropy_threshold)


def _block_counts(
    source: torch.Tensor, cfg: SparsePrefillConfig, seq_len: int, policy: Selection, backend: Backend
) -> BlockCounts:
    """`kernels.block_selection.block_counts` of the entropy (or spread entropy) `source` ``[Hkv, nseg]``
    under the config's rule (`fixed`: one budget; `spread`: the spread rule; `causal`: rigid so far)."""
    return block_counts(
        source,
        seq_len=seq_len,
        segment_size=cfg.segment_size,
        block_size=cfg.block_size,
        threshold_len=cfg.threshold_len,
        entropy_threshold=cfg.entropy_threshold,
        base_budget=cfg.base_budget,
        alpha=cfg.alpha,
        delta=cfg.delta,
        fixed_budget=cfg.fixed_budget if policy == "fixed" else None,
        spread_rule=spread_rule(cfg) if policy == "entropy" and cfg.mode == "spread" else None,
        causal=cfg.mode == "causal",
        backend=backend,
    )


def _with_budgets(
    bc: BlockCounts, budgets: torch.Tensor, cfg: SparsePrefillConfig, seq_len: int
) -> BlockCounts:
    """`bc` with its budgets replaced (the coverage rule) and the counts they give under the usual caps."""
    caps = count_caps(seq_len, cfg.segment_size, cfg.block_size, budgets.device)
    counts = counts_from_budgets(budgets, caps, cfg.block_size)
    kernel_counts = counts.masked_fill(bc.dense_segments[None, :], -1)
    return BlockCounts(bc.rigid, budgets, counts, kernel_counts, bc.dense_segments)


def _head_dim(logit_dim: int | None) -> int:
    if logit_dim is None:
        raise ValueError("mode 'coverage' needs logit_dim (the logits' temperature): plan_layer passes it")
    return logit_dim
