"""Decode steps on a sequence-parallel rank: each SP rank attends over the K/V it holds of a sequence, and
the partial outputs merge by log-sum-exp (`all_to_all.merge_partials`).

    decoder = SequenceParallelDecoder(engine, pages, obs_pool, sp)
    logits = decoder.forward(tokens, positions, tables, lengths, obs, is_sp, start, count)

Inputs as `PagedDecoder` (the core's global lengths ``[L, B, Hkv]``: tokens cached before this one), plus
which rows are sequence-parallel (``is_sp [B]``) and, for those, this rank's span of each (layer, KV head)
(`sp_compress.Spans`: ``start``, ``count`` int64 ``[L, B, Hkv]``): SP rank j holds indices ``[start, start +
count)`` of the row at local indices ``0 .. count`` of its pages (after an SP prefill its segment; after
compression its share of the kept slots); the last SP rank also every decode token, after its span (local
index ``length - start``). So per SP row, rank j < last attends its ``count`` keys and writes nothing (its
write goes to the scratch page), the last attends ``length - start + 1`` keys after writing the new one. A
row without SP is held whole by every SP rank (replicas): each writes and attends it alike, and only SP
rank 0's partial counts (the others' log-sum-exp is -inf), so the merge returns rank 0's output exactly.
Every SP rank then holds the same hidden states and logits.

A batch without SP rows runs the plain `PagedDecoder` (CUDA graphs on GPU); a batch with some runs eagerly
here. The partial attention is the Triton paged kernel with its log-sum-exp (`lse_out`) on CUDA, and
`paged_attention_lse` elsewhere (each row's pages gathered, float32 torch).
"""

from __future__ import annotations

import torch

from entropyinfer.kernels.paged_decode_attention import paged_decode_attention
from entropyinfer.kernels.paged_kv_write import paged_kv_write
from entropyinfer.shard.compression import ObservationPool
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.paged_decode import ObsIndex, PagedDecoder
from entropyinfer.shard.parallel.all_to_all import SequenceParallelGroup, merge_partials


def paged_attention_lse(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over paged KV that also returns its log-sum-exp: ``q [B, Hq, d]`` over
    ``k_pages``, ``v_pages`` ``[num_pages, Hkv, page_size, d]`` with ``tables [B, Hkv, P]`` and ``lengths
    [B, Hkv]`` (keys ``[0, length)`` of each head) -> ``(out [B, Hq, d] in q's dtype, lse float32 [B, Hq])``;
    a head without keys gives zeros and -inf."""
    b, hq, d = q.shape
    hkv, ps = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    heads = torch.arange(hkv, device=q.device)[:, None]
    for i, lens in enumerate(lengths.tolist()):
        longest = max(lens)
        if longest <= 0:
            continue
        ids = tables[i, :, : -(-longest // ps)].long()
        k = k_pages[ids, heads].reshape(hkv, -1, d)[:, :longest].float()  # [Hkv, L, d]
        v = v_pages[ids, heads].reshape(hkv, -1, d)[:, :longest].float()
        scores = torch.einsum("hgd,hld->hgl", q[i].view(hkv, g, d).float(), k) * d**-0.5
        keep = torch.arange(longest, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        m = torch.logsumexp(scores, dim=-1)  # [Hkv, G]
        p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[..., None])
        out[i] = torch.einsum("hgl,hld->hgd", p, v).reshape(hq, d)
        lse[i] = m.reshape(hq)
    return out.to(q.dtype), lse


def partial_attention(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention_lse`'s result: the Triton kernel on CUDA, the torch path on the CPU."""
    if q.device.type == "cuda":
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        out = paged_decode_attention(q, k_pages, v_pages, tables, lengths, lse_out=lse)
        return out, lse
    return paged_attention_lse(q, k_pages, v_pages, tables, lengths)


class SequenceParallelDecoder:
    """Decode steps of batches with sequence-parallel rows (see the module docstring); `plain` runs the
    others (the rank's `PagedDecoder`)."""

    def __init__(
        self,
        engine: Engine,
        pages: KVPages,
        obs_pool: ObservationPool,
        sp: SequenceParallelGroup,
        plain: PagedDecoder | None = None,
    ) -> None:
        self.engine, self.model, self.pages, self.obs_pool = engine, engine.model, pages, obs_pool
        self.sp, self.arch = sp, engine.arch
        # batches without SP rows (graphs on GPU): `plain`, or a decoder of the same pages
        self.plain = plain if plain is not None else PagedDecoder(engine, pages, obs_pool)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        obs: ObsIndex | None,
        rows_sp: torch.Tensor,
        start: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        """One step of a batch with SP rows (`rows_sp` bool ``[B]``; see the module docstring)."""
        sp, dev = self.sp, tokens.device
        b = tokens.shape[0]
        hq, d, ps = self.arch.num_heads, self.arch.head_dim, self.pages.page_size
        is_sp = rows_sp.to(dev)[None, :, None].expand_as(lengths)
        lens = lengths.long()  # [L, B, Hkv]
        if sp.last:  # holds the decode tokens of SP rows, after its span
            write = torch.where(is_sp, lens - start, lens)
            attend, skip = write + 1, torch.zeros_like(is_sp)
        else:
            # an SP row's table holds this rank's span only: its (skipped) write indexes page 0
            write, attend, skip = lens.masked_fill(is_sp, 0), torch.where(is_sp, count, lens + 1), is_sp
        write_page = tables.long()[None].expand(lens.shape[0], -1, -1, -1).gather(3, (write // ps)[..., None])
        write_page = write_page[..., 0].masked_fill(skip, self.pages.scratch_page)
        write_off = (write % ps).masked_fill(skip, 0)
        counts = rows_sp.to(dev) | (sp.rank == 0)  # [B]: rows whose partial here counts
        attend = attend.to(torch.int32)
        h = self.model.model.embed_tokens(tokens)[:, None]  # [B, 1, hidden]
        cos, sin = self.model.rotary(positions[:, None], self.engine.dtype)
        for li, layer in enumerate(self.model.layers):
            q, k, v = layer.attention_inputs(h, cos, sin)  # [B, H, 1, d]
            paged_kv_write(k[:, :, 0], v[:, :, 0], self.pages.kv(li), write_page[li], write_off[li])
            k_pages, v_pages = self.pages.k(li), self.pages.v(li)
            if obs is not None:
                self.obs_pool.append(li, obs[0], obs[1], q)
            o, lse = partial_attention(q[:, :, 0], k_pages, v_pages, tables, attend[li])
            lse = lse.masked_fill(~counts[:, None], float("-inf"))
            o = merge_partials(sp, o, lse)  # [B, Hq, d]
            h = layer.finish(h, o.reshape(b, 1, hq * d))
        return self.model.logits(h[:, 0])
