"""`SparsePrefill`: the prefill attention of the sparse policies (EntropyInfer `entropy`, CritiPrefill
`fixed`), one shot or chunk by chunk, with the per-layer state that carries a prompt's profile from chunk to
chunk and across requests (prefix caching). It implements `shard/attention.py: PrefillAttention`; the
policy decides the blocks (`policies/entropy.py`), the kernel computes (`kernels/sparse_prefill.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from entropyinfer.kernels.block_layout import num_blocks, num_segments
from entropyinfer.kernels.block_scoring import LogitReduce
from entropyinfer.kernels.paged_block_reps import paged_block_reps
from entropyinfer.kernels.paged_sparse_prefill import paged_sparse_prefill_attention
from entropyinfer.kernels.sparse_prefill import sparse_prefill_attention
from entropyinfer.policies.budgets import fixed_budget_for_density
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.entropy import ChunkPlan, plan_chunk, plan_layer
from entropyinfer.policies.registry import Selection
from entropyinfer.shard.dense_attention import dense_causal_attention, dense_chunk_attention
from entropyinfer.shard.paged_prefix import PagedPrefix
from entropyinfer.shard.prefill_state import (
    LayerRecord,
    PrefillState,
    head_entropy,
    prefill_stats,
    sparse_counts,
)

__all__ = ["SparsePrefill"]

ChunkKeys = tuple[torch.Tensor, torch.Tensor] | PagedPrefix  # a chunk's keys and values from 0, or its pages

# A chunk at an offset holding the prompt's last segment (always dense) runs that segment apart, through
# dense chunk attention (the flash kernel splits the keys of a short query block), once the segment's prefix
# reaches this many keys: in the sparse kernel its few programs each read the whole prefix while the rest of
# a chunk's grid was long done (the last 2048-token chunk of a 128k prompt took 262 ms against 85 ms for the
# others on an H200, benchmarks/engine_serving.py part b). A whole prompt in one call keeps it in the kernel,
# where the rest of the grid overlaps it (apart, a 128k layer took 17.0 ms against 15.4 ms).
DENSE_TAIL_MIN_PREFIX = 8192


class SparsePrefill:
    """EntropyInfer (`entropy`) or CritiPrefill (`fixed`) prefill: per layer, profile the blocks, pick
    per-(KV head, segment) block lists (`policies/entropy.py`), run the block-sparse kernel on them.
    Layer 0 runs dense, and so do prompts too short to have a sparse segment.

    State: ``records[layer]`` (`LayerRecord`: the layer's entropy history, counts, rigid heads) for every
    profiled layer of the current prompt; ``seq_len`` the prompt's length. Chunkable rules (`fixed`, modes
    `causal` / `spread`) profile every layer >= 1 even of a short prompt (a later, longer request may continue
    from its state), but report such a prompt as dense in `stats`, like the one-shot rules.

    Nothing here waits for the GPU: per-layer statistics stay device tensors until `stats()`, so the host
    keeps queueing the next layers' kernels while this one runs."""

    def __init__(self, policy: Selection, config: SparsePrefillConfig):
        self.policy, self.config = policy, config
        # what the layers run with: `config`, or for `fixed` with a target_density the solved budget
        self.layer_config: SparsePrefillConfig | None = None if self._solves_budget else config
        self.records: dict[int, LayerRecord] = {}
        self.seq_len: int | None = None
        self._start = 0  # first position this object prefills (after `resume`: the cached prefix)
        self._layers = 0  # layers run so far (the statistics average over them)
        # the policy actor's head budget table pinned for this prompt (`pin_table`): float32 [L, Hkv] on the
        # host, its version (0: none, the rule's own budgets); collect_mass: keep the captured-mass proxy
        # per layer (`captured`, device tensors [Hkv, segments so far]) for the head statistics
        self.head_scale: torch.Tensor | None = None
        self.table_version, self.table_digest = 0, ""
        self.collect_mass = False
        self.captured: dict[int, list[torch.Tensor]] = {}
        # tensor parallelism with replicated KV heads: the replicas' block logits made the GQA group's
        # (`shard/parallel/group.py`), so every replica picks one rank's blocks; None on one rank
        self.logit_reduce: LogitReduce | None = None
        self.rank_reduce: LogitReduce | None = None  # the same for `ranking: queries` (a max)
        self.dense_tail_min_prefix = DENSE_TAIL_MIN_PREFIX
        # per layer, the element-wise max and min of the queries of the last segment's pieces so far (a
        # chunk that ends inside it), ``[Hq, 1, d]`` each: its profile runs with its last piece
        self._tail_reps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pin_table(self, scales: torch.Tensor, version: int) -> None:
        """Scale the entropy rule's budget of each (layer, KV head) by ``scales [L, Hkv]`` for this prompt
        (`policies/head_scaling.py`); the version becomes part of `key` (prefix cache, `resume`)."""
        self.head_scale, self.table_version = scales.float().cpu(), int(version)
        # the key names the table by its content too: a restarted actor may reuse a version number
        self.table_digest = hashlib.sha256(self.head_scale.numpy().tobytes()).hexdigest()[:16]

    def _scale(self, layer: int) -> torch.Tensor | None:
        if self.head_scale is None or self.policy != "entropy" or layer >= self.head_scale.shape[0]:
            return None
        return self.head_scale[layer]

    @property
    def _solves_budget(self) -> bool:
        return self.policy == "fixed" and self.config.target_density is not None

    @property
    def chunkable(self) -> bool:
        """Chunks give one-shot's blocks: `fixed`, or `entropy` in a causal mode (`causal`, `spread`)."""
        return self.policy == "fixed" or self.config.causal

    @property
    def prefix_cacheable(self) -> bool:
        """Another prompt may continue from this one's `state_at`: chunkable, and the blocks of a segment do
        not depend on the prompt's length (not `fixed` with a target_density, solved per length)."""
        return self.chunkable and not self._solves_budget

    @property
    def segment_size(self) -> int:
        """Chunks start at multiples of this (and end at one, or at the prompt's end)."""
        return self.config.segment_size

    @property
    def key(self) -> str:
        """Fingerprint of what shapes the blocks: the policy, the layers' config, the head budget table."""
        table = f":heads{self.table_version}-{self.table_digest}" if self.table_version else ""
        return f"{self.policy}:{self.layer_config or self.config!r}{table}"

    def begin(self, num_layers: int, seq_len: int) -> None:
        """Called before layer 0 of a prompt (`Engine.prefill`): forget the previous prompt's state; for
        `fixed` with a `target_density`, the fixed budget whose mean density over the `num_layers` layers of
        this `seq_len`-token prompt is closest to the target (`policies.budgets.fixed_budget_for_density`;
        host arithmetic, no device sync)."""
        self.records, self.seq_len, self._start, self._layers = {}, seq_len, 0, num_layers
        self.captured, self._tail_reps = {}, {}
        if not self._solves_budget:
            return
        cfg = self.config
        budget = fixed_budget_for_density(
            float(cfg.target_density or 0.0),
            seq_len=seq_len,
            segment_size=cfg.segment_size,
            block_size=cfg.block_size,
            threshold_len=cfg.threshold_len,
            num_layers=num_layers,
        )
        self.layer_config = dataclasses.replace(cfg, fixed_budget=budget, target_density=None)

    def _cfg(self) -> SparsePrefillConfig:
        if self.layer_config is None:
            raise RuntimeError(
                "fixed policy with target_density: call begin(num_layers, seq_len) before the first layer "
                "(Engine.prefill does)"
            )
        return self.layer_config

    def _short(self, cfg: SparsePrefillConfig, n: int) -> bool:
        """No segment of the prompt can be sparse (each starts before threshold_len or is the last)."""
        return n <= max(cfg.threshold_len, cfg.segment_size) + cfg.segment_size

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[1]
        if self.chunkable:  # one chunk: the same code as a chunked prefill, so the same blocks
            return self.chunk(layer, q, k, v, 0, n)
        cfg = self._cfg()
        if layer in self.records or self.seq_len != n:  # a new prompt without begin()
            self.records, self.seq_len = ({} if layer in self.records else self.records), n
        self._layers = max(self._layers, layer + 1)
        if layer == 0 or self._short(cfg, n):
            return dense_causal_attention(q, k, v)
        plan = plan_layer(
            q, k, cfg, policy=self.policy, head_scale=self._scale(layer), with_mass=self.collect_mass,
            logit_reduce=self.logit_reduce, rank_reduce=self.rank_reduce,
        )  # fmt: skip
        if plan.captured is not None:
            self.captured[layer] = [plan.captured]
        s_len, b = cfg.segment_size, cfg.block_size
        out = sparse_prefill_attention(
            q, k, v, plan.block_idx, plan.kernel_counts, segment_size=s_len, block_size=b
        )
        self.records[layer] = LayerRecord(plan.entropy, plan.counts, plan.spread, plan.rigid)
        return out

    def chunk(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, seq_len: int
    ) -> torch.Tensor:
        """One prefill chunk of one layer: ``q [Hq, q1 - q0, d]`` at positions ``[q_offset, q1)``, ``k``,
        ``v`` ``[Hkv, q1, d]`` (keys from position 0), ``seq_len`` the whole prompt's length ``n`` ->
        ``[Hq, q1 - q0, d]``. ``q_offset`` a multiple of S, ``q1`` one too or ``n``; chunks in order, each
        through layers 0.. before the next (a layer's record holds its segments so far)."""
        return self._chunk(layer, q, (k, v), q_offset, seq_len)

    def chunk_paged(
        self, layer: int, q: torch.Tensor, prefix: PagedPrefix, q_offset: int, seq_len: int
    ) -> torch.Tensor:
        """`chunk` over keys that lie in the sequence's KV pages (`Engine.prefill_pages`). With
        ``prefix.in_place`` (`EngineConfig.paged_prefix_reads`) profiling reads the prefix's block max/min
        from the pages and the sparse kernel reads the selected blocks (and any dense segment's keys)
        through the page table: no copy of the prefix; a chunk whose every segment is dense (layer 0 among
        them) gathers it for fused SDPA. Same blocks and output as `chunk` over the gathered keys (the torch
        path: bit for bit). Without it, `chunk` over the gathered prefix."""
        if not prefix.in_place or prefix.start == 0:
            return self.chunk(layer, q, *prefix.contiguous(), q_offset, seq_len)
        return self._chunk(layer, q, prefix, q_offset, seq_len)

    def _chunk(
        self,
        layer: int,
        q: torch.Tensor,
        keys: ChunkKeys,
        q_offset: int,
        seq_len: int,
    ) -> torch.Tensor:
        if not self.chunkable:
            raise ValueError(f"mode {self.config.mode!r} is not causal: prefill it in one shot")
        cfg, s_len = self._cfg(), self.config.segment_size
        hkv, nk = _kv_shape(keys)
        q1 = q_offset + q.shape[1]
        last = (num_segments(seq_len, s_len) - 1) * s_len  # where the prompt's dense last segment starts
        if (q_offset % s_len and q_offset < last) or (q1 % s_len and q1 < last) or q1 > seq_len or nk < q1:
            raise ValueError(
                f"chunk [{q_offset}, {q1}) of a {seq_len}-token prompt with {nk} keys: it must start "
                f"and end at multiples of S={s_len} or inside the prompt's last segment [{last}, {seq_len})"
            )
        seg0 = q_offset // s_len
        rec = self.records.get(layer)
        if self.seq_len != seq_len or (rec is not None and seg0 < rec.segments):  # a new prompt, no begin()
            if q_offset != 0 or self._start:
                done = "?" if rec is None else rec.segments
                raise ValueError(
                    f"chunk at {q_offset} of a {seq_len}-token prompt (layer {layer} has {done} segments so "
                    f"far, begin({self.seq_len}) prefills from {self._start}): call begin() for a new prompt"
                )
            self.records, self.seq_len, self._start, rec = {}, seq_len, 0, None
            self._tail_reps = {}
        self._layers = max(self._layers, layer + 1)
        if layer == 0:
            return dense_chunk_attention(q, *_contiguous(keys), q_offset)
        if rec is None:
            spread = cfg.mode == "spread" and self.policy == "entropy"
            rec = self.records[layer] = LayerRecord.empty(hkv, q.device, spread)
        rec.to(q.device)
        if rec.segments != seg0:
            raise ValueError(f"layer {layer} has {rec.segments} segments so far; this chunk starts at {seg0}")
        if q_offset <= last and not last < q1 < seq_len:  # whole segments (the last one whole too)
            return self._attend(layer, q, keys, q_offset, seq_len, self._plan(layer, q, keys, q_offset, rec))
        # a piece of the last segment (the scheduler cuts it, `Scheduler._dense_cap`), after any whole
        # segments: it attends densely; the segment's profile, which one-shot computes from its queries'
        # element-wise max and min, runs with its last piece from the max and min of all (the same numbers)
        head = max(last - q_offset, 0)
        outs = []
        if head:
            plan = self._plan(layer, q[:, :head], keys, q_offset, rec)
            outs.append(self._attend(layer, q[:, :head], keys, q_offset, seq_len, plan))
        piece = q[:, head:]
        qmax, qmin = piece.amax(dim=1, keepdim=True), piece.amin(dim=1, keepdim=True)
        if layer in self._tail_reps:  # the earlier pieces'
            pmax, pmin = self._tail_reps.pop(layer)
            qmax, qmin = torch.maximum(qmax, pmax), torch.minimum(qmin, pmin)
        if q1 < seq_len:
            self._tail_reps[layer] = (qmax, qmin)
        else:  # two query rows whose max and min are the segment's
            self._plan(layer, torch.cat([qmax, qmin], dim=1), keys, last, rec)
        outs.append(dense_chunk_attention(piece, *_contiguous(keys), q_offset + head))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _plan(
        self,
        layer: int,
        q: torch.Tensor,
        keys: ChunkKeys,
        q_offset: int,
        rec: LayerRecord,
    ) -> ChunkPlan:
        """Profile the whole segments of ``q`` (from `q_offset`, a multiple of S; the prompt's last one
        perhaps partial) and pick their blocks; their record joins `rec`."""
        cfg, s_len = self._cfg(), self.config.segment_size
        hkv, nk = _kv_shape(keys)
        if isinstance(keys, PagedPrefix):  # profiling reads the blocks' max/min from the pages
            visible = num_blocks(q_offset + q.shape[1], s_len, cfg.block_size)  # the last segment's
            key_reps = paged_block_reps(keys.k_pages, keys.table, visible, cfg.block_size)
            k = keys.k_chunk.new_empty(()).expand(hkv, nk, q.shape[-1])  # a shape only
            key_pages: tuple[torch.Tensor, torch.Tensor] | None = (keys.k_pages, keys.table)
        else:
            key_reps, k, key_pages = None, keys[0], None
        plan = plan_chunk(
            q, k, cfg, seq_len=self.seq_len or 0, segment_offset=q_offset // s_len,
            entropy_before=rec.entropy, spread_before=rec.spread, policy=self.policy,
            head_scale=self._scale(layer), with_mass=self.collect_mass, logit_reduce=self.logit_reduce,
            key_reps=key_reps, key_pages=key_pages, rank_reduce=self.rank_reduce,
        )  # fmt: skip
        rec.append(plan.entropy, plan.counts, plan.spread, plan.rigid)
        if plan.captured is not None:
            self.captured.setdefault(layer, []).append(plan.captured)
        return plan

    def _attend(
        self,
        layer: int,
        q: torch.Tensor,
        keys: ChunkKeys,
        q_offset: int,
        seq_len: int,
        plan: ChunkPlan,
    ) -> torch.Tensor:
        """The attention of whole segments with `plan`'s blocks: fused SDPA if every one is dense, else the
        block-sparse kernel (a long prompt's dense last segment apart, `DENSE_TAIL_MIN_PREFIX`)."""
        cfg, s_len = self._cfg(), self.config.segment_size
        hkv, nk = _kv_shape(keys)
        q1, seg0, nc = q_offset + q.shape[1], q_offset // s_len, plan.counts.shape[1]
        thr = cfg.threshold_len
        if all(s * s_len < thr or (s + 1) * s_len >= seq_len for s in range(seg0, seg0 + nc)):
            return dense_chunk_attention(q, *_contiguous(keys), q_offset)  # every segment dense: fused SDPA
        block_idx, kernel_counts = plan.block_idx, plan.kernel_counts
        if seg0:  # the kernel indexes rows by absolute segment; rows < seg0 are never read
            width = block_idx.shape[2]
            block_idx = block_idx.new_empty(hkv, seg0 + nc, width)
            block_idx[:, seg0:] = plan.block_idx
            kernel_counts = kernel_counts.new_full((hkv, seg0 + nc), -1)
            kernel_counts[:, seg0:] = plan.kernel_counts
        b = cfg.block_size
        last = (num_segments(seq_len, s_len) - 1) * s_len  # where the prompt's dense last segment starts
        split = 0 < q_offset < last and q1 == seq_len and last >= self.dense_tail_min_prefix
        body = q[:, : last - q_offset] if split else q
        if isinstance(keys, PagedPrefix):
            out = paged_sparse_prefill_attention(
                body, keys.k_pages, keys.v_pages, keys.table, block_idx, kernel_counts, kv_len=nk,
                segment_size=s_len, block_size=b, q_offset=q_offset,
            )  # fmt: skip
        else:
            out = sparse_prefill_attention(
                body, keys[0], keys[1], block_idx, kernel_counts, segment_size=s_len, block_size=b,
                q_offset=q_offset,
            )  # fmt: skip
        if not split:
            return out
        tail = dense_chunk_attention(q[:, last - q_offset :], *_contiguous(keys), last)
        return torch.cat([out, tail], dim=1)

    # ------------------------------------------------------------------ prefix caching

    def state_at(self, segments: int) -> PrefillState:
        """The state after the prompt's first `segments` segments (every layer must have run them)."""
        if not self.prefix_cacheable:
            raise ValueError(
                f"{self.policy} ({self.config.mode}) prefill state cannot be reused by another prompt"
            )
        for layer, rec in self.records.items():
            if rec.segments < segments:
                raise ValueError(f"layer {layer} has run {rec.segments} segments, fewer than {segments}")
        top = max(self.records, default=0)
        layers = tuple(
            self.records[li].state_at(segments) if li in self.records else None for li in range(top + 1)
        )
        return PrefillState(self.policy, self.key, self.config.segment_size, segments, layers)

    def resume(self, state: PrefillState) -> None:
        """Continue a prompt whose first ``state.segments`` segments another prefill ran (its `state_at`):
        call after `begin` and before the first chunk, which starts at ``state.tokens``."""
        if not self.prefix_cacheable or state.key != self.key:
            raise ValueError(f"cannot resume a {state.key!r} state in a {self.key!r} prefill")
        if self.seq_len is not None and self.seq_len <= state.tokens:
            raise ValueError(
                f"a {self.seq_len}-token prompt has nothing left after {state.tokens} cached tokens"
            )
        if self.seq_len is None:
            raise ValueError("call begin(num_layers, seq_len) before resume()")
        self.records = {li: LayerRecord.resumed(ls) for li, ls in enumerate(state.layers) if ls is not None}
        self._start = state.tokens

    # ------------------------------------------------------------------ statistics

    def _profiled(self) -> dict[int, LayerRecord]:
        """The layers reported as sparse: every record, unless the prompt is too short to be sparse."""
        cfg = self.layer_config or self.config
        if self.seq_len is None or self._short(cfg, self.seq_len):
            return {}
        return self.records

    @property
    def profiled(self) -> dict[int, LayerRecord]:
        """The records of the layers reported as sparse (none for a prompt too short to be sparse)."""
        return self._profiled()

    @property
    def sparse_counts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sparse layer, in order: ``(counts [Hkv, nseg], dense_segments [nseg])`` of the whole prompt."""
        return sparse_counts(self._profiled(), self.seq_len or 0, self.layer_config or self.config)

    def head_entropy(self, num_kv_heads: int) -> torch.Tensor | None:
        """float32 ``[layers, Hkv]`` (CPU): each KV head's mean block entropy over segments >= 1, NaN for
        layers that ran dense; None if no layer was profiled. Feeds per-head KV compression capacities."""
        return head_entropy(self._profiled(), self._layers, num_kv_heads)

    def stats(self) -> dict[str, Any]:
        """density, rigid_fraction (and per layer), budget_tokens, fixed_budget (solved),
        rigid_fraction_reference (spread mode): `prefill_state.prefill_stats`."""
        out = prefill_stats(
            self._profiled(), self._layers, self.seq_len or 0, self.layer_config or self.config, self.policy
        )
        if self._solves_budget and self.layer_config is not None:
            out["fixed_budget"] = self.layer_config.fixed_budget  # solved for target_density
        return out


def _kv_shape(keys: ChunkKeys) -> tuple[int, int]:
    """(KV heads, keys) of a chunk's keys, contiguous or in pages."""
    if isinstance(keys, PagedPrefix):
        return keys.table.shape[0], keys.end
    return keys[0].shape[0], keys[0].shape[1]


def _contiguous(keys: ChunkKeys) -> tuple[torch.Tensor, torch.Tensor]:
    return keys.contiguous() if isinstance(keys, PagedPrefix) else keys
