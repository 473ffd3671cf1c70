"""Sequence-parallel prefill of one long prompt (DeepSpeed Ulysses' layout): each SP rank runs the token-wise
work of its own contiguous segment and keeps that segment's K/V; around attention an all-to-all
(`all_to_all.py`) gives each rank its heads over the whole prompt, so the prefill attention (dense, or a
sparse policy's profiling and kernel) sees every key of its heads, exactly as one rank would.

    if uses_sequence_parallel(parallel, n, compresses, all_logits):
        logits = sequence_parallel_prefill(engine, sp, split, tokens, pages, table, attention)

Layout. An ``n``-token prompt is padded to a multiple of ``sp`` (Ulysses needs equal segments): segment
length ``S = ceil(n / sp)``, SP rank ``j`` holds positions ``[j S, (j + 1) S)``; padding sits past ``n``, so
no real query sees it (causal) and it is cut off before attention, which runs on the ``n`` real positions
(the sparse policy's segments are the one-rank ones). Rank j writes its segment's K/V into its own pages at
*local* positions ``0 .. S`` of the sequence's block table (the table the core allocated for the whole
prompt; the decode tokens go to the last rank, after its segment: `sp_decode.py`). The last position's
logits come from the last SP rank, broadcast to the others.

Which prompts: at least `sequence_parallel_min_tokens`, a non-empty last segment, no prompt logprobs (every
position's logits on one rank) and no adaptive KV capacities (those run without SP). With decode-time KV
compression the last prompt queries are all-reduced into every rank's observation row, and compression
runs per segment (`sp_compress.py`). SP prompts prefill in one pass and bypass the prefix cache
(`EngineCore._plan_prefill`). Shorter prompts run on every SP rank alike (replicas).

Statistics: each rank's attention object profiles its KV heads over the whole prompt; `gather_entropy` and
`gather_stats` put the SP ranks' heads together (means weighted by their head counts), so the result
equals one rank's; ``density_per_sp_rank`` keeps each SP rank's own (its share of the attention work: entropy
budgets differ per head, so the densest rank is the prefill's straggler).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from entropyinfer.kernels.paged_kv_write import paged_kv_write
from entropyinfer.policies.kv_compression import KVCompressionConfig
from entropyinfer.shard.attention import PrefillAttention
from entropyinfer.shard.config import ParallelConfig
from entropyinfer.shard.engine import ChunkQueries, Engine, ProgressFn
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.parallel.all_to_all import HeadSplit, SequenceParallelGroup, to_heads, to_sequence
from entropyinfer.shard.sparse_attention import SparsePrefill

_STAT_KEYS = ("density", "rigid_fraction", "rigid_fraction_reference")


def segment_length(seq_len: int, sp: int) -> int:
    return -(-seq_len // sp)


def uses_sequence_parallel(
    parallel: ParallelConfig, seq_len: int, kv: KVCompressionConfig | None, all_logits: bool
) -> bool:
    """Whether a prompt prefills sequence-parallel (see the module docstring); `kv`: the request's decode-time
    compression (None: none)."""
    sp = parallel.sequence_parallel_size
    if sp == 1 or all_logits or seq_len < parallel.sequence_parallel_min_tokens:
        return False
    if kv is not None and (kv.adaptive or kv.prompt_queries > seq_len):
        return False
    return seq_len > (sp - 1) * segment_length(seq_len, sp)  # the last segment holds a real token


@torch.inference_mode()
def sequence_parallel_prefill(
    engine: Engine,
    sp: SequenceParallelGroup,
    split: HeadSplit,
    tokens: torch.Tensor,
    pages: KVPages,
    table: torch.Tensor,
    attention: PrefillAttention,
    progress: ProgressFn | None = None,
    observe: ChunkQueries | None = None,
    observed: int = 0,
) -> torch.Tensor:
    """One SP rank's part of a whole prompt ``tokens [n]`` (every rank passes all of them); `table` int64
    ``[Hkv, pages]`` on the device; `attention` begun for ``n`` tokens, over this rank's `split` heads;
    `observe` gets the queries of the prompt's last `observed` positions on every rank (all-reduced from the
    ranks that hold them). -> fp32 logits of the prompt's last position ``[vocab]`` on every SP rank."""
    arch, dev, dt = engine.arch, engine.device, engine.dtype
    n, hq, hkv, d, ps = tokens.shape[0], arch.num_heads, arch.num_kv_heads, arch.head_dim, pages.page_size
    s = segment_length(n, sp.size)
    start = sp.rank * s
    real = max(0, min(n - start, s))  # this segment's prompt tokens (the rest is padding)
    mine = torch.zeros(s, dtype=torch.long)
    mine[:real] = tokens[start : start + real]
    step = engine.config.prefill_chunk_size
    spans = [(c0, min(s, c0 + step)) for c0 in range(0, s, step)]
    h = engine.model.model.embed_tokens(mine.to(dev))  # [S, hidden]
    cos, sin = engine.model.rotary(torch.arange(start, start + s, device=dev), dt)
    q = torch.empty(hq, s, d, device=dev, dtype=dt)
    k = torch.empty(hkv, s, d, device=dev, dtype=dt)
    v = torch.empty(hkv, s, d, device=dev, dtype=dt)
    local = torch.arange(real, device=dev)  # where the segment's K/V go: local positions of the table
    # [real, Hkv] each, contiguous (`paged_kv_write`'s layout, as in `Engine.prefill_pages`)
    write_page = table[:, local // ps].T.contiguous()
    write_off = (local % ps)[:, None].expand(real, hkv).contiguous()
    layers = engine.model.layers
    for li, layer in enumerate(layers):
        layer.prefill_inputs(h, cos, sin, q, k, v, spans)
        paged_kv_write(
            k[:, :real].transpose(0, 1), v[:, :real].transpose(0, 1), pages.kv(li), write_page, write_off
        )
        if observe is not None and observed > 0:  # the last prompt queries, wherever they are, on every rank
            window = torch.zeros(hq, observed, d, device=dev, dtype=dt)
            lo, hi = max(start, n - observed), min(start + real, n)
            if lo < hi:
                window[:, lo - (n - observed) : hi - (n - observed)] = q[:, lo - start : hi - start]
            observe.record_chunk(li, sp.all_reduce(window), n - observed, n)
        q_h, k_h, v_h = to_heads(sp, split, q, k, v)  # [Hq_j, sp * S, d], ...
        if q_h.shape[1] != n:  # the padding past the prompt never reaches attention
            q_h, k_h, v_h = (x[:, :n].contiguous() for x in (q_h, k_h, v_h))
        attn = attention(li, q_h, k_h, v_h)  # [Hq_j, n, d]
        del q_h, k_h, v_h
        if attn.shape[1] != sp.size * s:
            attn = torch.nn.functional.pad(attn, (0, 0, 0, sp.size * s - attn.shape[1]))
        layer.prefill_finish(h, to_sequence(sp, split, attn), spans)
        del attn
        if progress is not None:
            progress(n * (li + 1) // len(layers), n)
    logits = torch.empty(arch.vocab_size, dtype=torch.float32, device=dev)
    if sp.last:
        logits = engine.model.logits(h[real - 1]).contiguous()
    return sp.broadcast(logits, sp.size - 1)


# ---------------------------------------------------------------------------------------- statistics
def gather_entropy(
    sp: SequenceParallelGroup,
    split: HeadSplit,
    attention: PrefillAttention,
    num_layers: int,
    device: torch.device,
) -> torch.Tensor | None:
    """float32 ``[L, Hkv]`` of the tensor-parallel rank's KV heads (SP ranks' heads side by side), None if
    no layer was profiled (`SparsePrefill.head_entropy`)."""
    own = split.kv[sp.rank]
    entropy = attention.head_entropy(own) if isinstance(attention, SparsePrefill) else None
    widest = max(split.kv)
    mine = torch.full((num_layers, widest), math.nan)
    if entropy is not None:
        mine[: entropy.shape[0], :own] = entropy[:num_layers].float()
    every = sp.all_gather(mine.to(device)).cpu()  # [sp, L, widest]
    if entropy is None:
        return None
    return torch.cat([every[j, :, : split.kv[j]] for j in range(sp.size)], dim=1)


def gather_stats(
    sp: SequenceParallelGroup, split: HeadSplit, stats: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """The SP ranks' prefill statistics as one rank's over all their heads: means weighted by KV heads
    (density, rigid fractions, mean budget), min / max of the ranks'."""
    budget = stats.get("budget_tokens") or {}
    per_layer = [math.nan if x is None else x for x in stats.get("rigid_fraction_per_layer", [])]
    values = [stats.get(key, math.nan) for key in _STAT_KEYS]
    values += [budget.get(key, math.nan) for key in ("mean", "min", "max")] + per_layer
    every = sp.all_gather(torch.tensor(values, dtype=torch.float64, device=device)).cpu()  # [sp, n]
    w = torch.tensor(split.kv, dtype=torch.float64)[:, None] / sum(split.kv)
    mean = (every * w).sum(dim=0)
    out = dict(stats)
    for i, key in enumerate(_STAT_KEYS):
        if key in stats:
            out[key] = float(mean[i])
    if "density" in stats:  # each SP rank's heads' attention work over the whole prompt (stragglers)
        out["density_per_sp_rank"] = [round(float(x), 4) for x in every[:, 0]]
    col = len(_STAT_KEYS)
    if budget:
        out["budget_tokens"] = {
            **budget,
            "mean": float(mean[col]),
            "min": int(every[:, col + 1].min()),
            "max": int(every[:, col + 2].max()),
        }
    if per_layer:
        out["rigid_fraction_per_layer"] = [None if math.isnan(x) else x for x in mean[col + 3 :].tolist()]
    return out
