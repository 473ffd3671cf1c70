"""Budget rules beyond the reference recurrence: the causal `spread` rule, and the `fixed` baseline at a
requested density. Pure decisions: config -> kernel parameters, and host arithmetic.

The reference rule (`mode: reference` / `per_head`, ALGORITHM.md step 7) reacts to ratios of consecutive
entropies of a nearly one-hot block distribution (unscaled logits), so its budgets follow numerical noise,
and its rigid test looks at the whole prompt. The spread rule (`mode: spread`) decides each (KV head,
segment) from that segment and the ones before it only, so appending text never changes earlier segments'
blocks (chunked prefill and prefix caching stay exact):

1. Spread entropy ``Hs[h, s]``: the entropy (nats) of ``softmax(spread_scale / sqrt(d) * logits)`` over the
   ``V_s = s * S / b`` blocks segment ``s`` sees, from the same block logits, at an attention-like temperature
   (`kernels.block_scoring`, same launch as the reference entropy). ``exp(Hs) = V_s ** (Hs / log V_s)`` is
   the effective number of blocks; ``Hs / log V_s`` the entropy normalised by the visible blocks.
2. Rigid so far: ``Hs / log V < rigid_entropy`` (the normalised entropy) in every segment up to ``s``;
   such a head keeps ``rigid_budget`` tokens, below the floor of the others (its top blocks, the attention
   sink on SmolLM2, plus as every head the segment's own keys: sink + local).
3. Other heads: ``B = clip(spread_factor * b * V_s ** (1 - gamma) * exp(Hs) ** gamma, min_budget, 3 * B0)``
   tokens, ``gamma = spread_power``: 1 gives ``spread_factor`` tokens-worth of blocks per effective block, 0 a
   fixed fraction of the visible blocks.
4. ``floor(B / b)`` blocks capped by what the segment sees, dense segments marked: as the reference rule.

The coverage rule (`mode: coverage`) asks, per (KV head, segment), for the fewest top blocks whose share
of ``softmax(coverage_scale / sqrt(d) * logits)`` over the visible blocks reaches ``coverage`` (the
captured-mass proxy of `policies/head_scaling.py` at its target), clipped to ``[min_budget, 3 * B0]``
tokens. It reads one segment's own logits only, so it is causal. Torch ops on the scores' device
(`coverage_budgets`), no kernel of its own; the top blocks are then selected as in every mode.

Kernels and their torch references: `block_scoring` / `block_scoring_ref.spread_entropy_ref` and
`block_selection` (`_counts_kernel`, spread mode) / `block_selection_ref.spread_counts_ref`.
"""

from __future__ import annotations

import math

import torch

from entropyinfer.kernels.block_layout import visible_blocks
from entropyinfer.kernels.block_selection_ref import SpreadRule
from entropyinfer.policies.config import SparsePrefillConfig

__all__ = [
    "coverage_budgets",
    "fixed_budget_for_density",
    "fixed_layer_density",
    "spread_logit_scale",
    "spread_rule",
]


def spread_logit_scale(cfg: SparsePrefillConfig, head_dim: int) -> float:
    """Multiplier of the block logits before the spread softmax: ``spread_scale / sqrt(d)``."""
    return float(cfg.spread_scale) / math.sqrt(head_dim)


def spread_rule(cfg: SparsePrefillConfig) -> SpreadRule:
    """The counts kernel's parameters of the spread rule, from the config's fields."""
    return SpreadRule(
        tokens_per_block=float(cfg.spread_factor * cfg.block_size),
        power=float(cfg.spread_power),
        min_budget=float(cfg.min_budget),
        max_budget=float(cfg.max_budget),
        rigid_entropy=float(cfg.rigid_entropy),
        rigid_budget=float(cfg.rigid_budget),
    )


def coverage_budgets(
    logits: torch.Tensor, cfg: SparsePrefillConfig, head_dim: int, segment_offset: int = 0
) -> torch.Tensor:
    """float32 ``[Hkv, rows]`` budgets (tokens, before the caps) of the coverage rule from block logits
    ``[Hkv, rows, nblocks]`` of segments ``segment_offset ..`` (entries past a row's visible blocks are
    ignored, whatever they hold): ``b * k`` with ``k`` the fewest top blocks whose softmax share reaches
    ``cfg.coverage``, clipped to ``[min_budget, 3 * B0]``; rows that see nothing get the floor."""
    _, rows, nblk = logits.shape
    vis = visible_blocks(rows, cfg.segment_size, cfg.block_size, logits.device, segment_offset)
    visible = torch.arange(nblk, device=logits.device)[None, :] < vis[:, None]
    z = (logits.float() * (cfg.coverage_scale / math.sqrt(head_dim))).masked_fill(~visible[None], -math.inf)
    p = torch.softmax(z, dim=-1).nan_to_num(0.0).sort(dim=-1, descending=True).values
    before = p.cumsum(dim=-1) - p  # mass of the blocks ranked above each one
    need = (before < cfg.coverage).logical_and(p > 0).sum(dim=-1)  # blocks until the share is reached
    budgets = need.float() * cfg.block_size
    return budgets.clamp(float(cfg.min_budget), float(cfg.max_budget))


# ----------------------------------------------------------------------------------------------------------
# The fixed baseline at a requested density


def fixed_layer_density(
    count: int, *, seq_len: int, segment_size: int, block_size: int, threshold_len: int
) -> float:
    """Density (`policies.entropy.plan_density`) of one sparse layer whose every (KV head, sparse segment)
    keeps ``count`` blocks (capped by what each segment sees). Host arithmetic, no tensors. A prompt too
    short to have a sparse segment (``N <= max(threshold_len, S) + S``) runs dense: 1.0."""
    s_len, n = segment_size, seq_len
    if n <= max(threshold_len, s_len) + s_len:
        return 1.0
    nseg = -(-n // s_len)
    last_cap = (nseg - 1) * s_len // block_size - ((n % s_len) // block_size + 1)
    work = 0.0
    for s in range(nseg):
        start, end = s * s_len, min((s + 1) * s_len, n)
        if start < threshold_len or start + s_len >= n:  # dense segment
            work += (end * (end + 1) - start * (start + 1)) / 2
        else:
            c = 0 if s == 0 else max(min(count, s * s_len // block_size, last_cap), 0)
            work += s_len * c * block_size + s_len * (s_len + 1) / 2
    return work / (n * (n + 1) / 2)


def fixed_budget_for_density(
    target: float,
    *,
    seq_len: int,
    segment_size: int,
    block_size: int,
    threshold_len: int,
    num_layers: int,
    dense_layers: int = 1,
) -> int:
    """The fixed budget (tokens, a multiple of b, at least b) whose prefill density is closest to `target`.

    Density as `shard.sparse_attention.SparsePrefill` reports it: the mean over `num_layers` layers, of
    which the first `dense_layers` (layer 0) run dense, of each layer's `fixed_layer_density`. Prompts too
    short for a sparse segment are dense whatever the budget (then the smallest budget is returned); a
    target below the smallest reachable density gives one block. Ties go to the larger budget. Host
    arithmetic only: solving needs the prompt length, never device data.
    """
    if num_layers < 1 or not 0 <= dense_layers <= num_layers:
        raise ValueError(f"need 0 <= dense_layers <= num_layers >= 1; got {dense_layers}, {num_layers}")
    sparse = num_layers - dense_layers

    def density(count: int) -> float:
        layer = fixed_layer_density(
            count,
            seq_len=seq_len,
            segment_size=segment_size,
            block_size=block_size,
            threshold_len=threshold_len,
        )
        return (dense_layers + sparse * layer) / num_layers

    lo, hi = 1, max(-(-seq_len // segment_size) - 1, 1) * segment_size // block_size
    while lo < hi:  # smallest count whose density reaches the target (density is non-decreasing)
        mid = (lo + hi) // 2
        if density(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 1 and abs(density(lo - 1) - target) < abs(density(lo) - target):
        best = lo - 1
    return best * block_size
