"""The sequence-parallel group of a rank and its collectives: the Ulysses all-to-all that switches a layer's
q / k / v from sequence-sharded to head-sharded and its output back, and the log-sum-exp merge of partial
decode attention.

    sp = SequenceParallelGroup.from_world(process_group)     # the ranks of one tensor-parallel rank
    split = split_heads(num_heads, num_kv_heads, sp.size)    # whole GQA groups per SP rank (maybe uneven)
    q_h, k_h, v_h = to_heads(sp, split, q, k, v)             # [Hq_j, sp * S, d], [Hkv_j, sp * S, d] each
    out = to_sequence(sp, split, attn)                       # [Hq, S, d]: this rank's segment, every head

Every SP rank holds the same heads of the model (those of its tensor-parallel rank) for its own contiguous
segment of ``S`` positions. `to_heads` gives SP rank ``j`` the KV heads ``split.kv_heads(j)`` and their
query heads over all ``sp * S`` positions, in one `all_to_all_single` of q, k and v together (uneven split
sizes: SmolLM2's 3 KV heads at SP=2 go 2 + 1). Whole GQA groups stay on one rank, so the entropy policy's
per-KV-head decisions (the mean over the group's query heads) are those of one rank. torch's
`all_to_all_single` rather than DeepSpeed's `DistributedAttention`: that one scatters heads evenly
(``Hq % sp == 0``) and has no hook for cutting the padding off before attention or for keeping each
segment's K/V; gloo's all-to-all (CPU) takes uneven splits, NCCL's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from entropyinfer.errors import ConfigError
from entropyinfer.shard.dense_attention import merge_by_lse


@dataclass(frozen=True)
class SequenceParallelGroup:
    rank: int
    size: int
    process_group: dist.ProcessGroup | None = None  # None: torch.distributed's default group

    @classmethod
    def from_world(cls, process_group: dist.ProcessGroup | None = None) -> SequenceParallelGroup:
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group), process_group)

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def global_rank(self, rank: int) -> int:
        if self.process_group is None:
            return rank
        return int(dist.get_global_rank(self.process_group, rank))

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[size, *x.shape]``: every rank's `x` in rank order (equal shapes)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.process_group)
        return torch.stack(parts)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns it."""
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_to_all(self, x: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        """Rows ``x[sum(send[:i]) : sum(send[:i+1])]`` go to rank i; the result holds ``receive[i]`` rows
        from each rank i, in rank order."""
        x = x.contiguous()
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x, receive, send, group=self.process_group)
        return out

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """`x` of SP rank `src` on every rank (in place; returns it)."""
        dist.broadcast(x, self.global_rank(src), group=self.process_group)
        return x


@dataclass(frozen=True)
class HeadSplit:
    """A tensor-parallel rank's heads over its SP ranks: SP rank j attends with the ``kv[j]`` KV heads from
    ``kv_start(j)`` and their ``group`` query heads each."""

    kv: tuple[int, ...]
    group: int

    @property
    def q(self) -> tuple[int, ...]:
        return tuple(n * self.group for n in self.kv)

    def kv_start(self, j: int) -> int:
        return sum(self.kv[:j])

    def q_start(self, j: int) -> int:
        return self.kv_start(j) * self.group


def max_sequence_parallel(num_kv_heads: int, tp: int) -> int:
    """The largest SP size for a model of `num_kv_heads` KV heads at tensor-parallel size `tp`: each SP rank
    needs a whole GQA group of the tensor-parallel rank's KV heads."""
    return num_kv_heads // tp if tp <= num_kv_heads else 1


def check_sequence_parallel(num_kv_heads: int, tp: int, sp: int) -> None:
    """ConfigError naming the sizes that work unless `sp` SP ranks can split a TP rank's KV heads."""
    top = max_sequence_parallel(num_kv_heads, tp)
    if not 1 <= sp <= top:
        raise ConfigError(
            f"sequence_parallel_size={sp} with tensor_parallel_size={tp}: each sequence-parallel rank "
            f"attends with whole GQA groups of a tensor-parallel rank's {top} KV head(s) "
            f"({num_kv_heads} KV heads in all), so sizes that work are 1..{top}"
        )


def split_heads(num_heads: int, num_kv_heads: int, sp: int) -> HeadSplit:
    """Whole GQA groups per SP rank, the first ``Hkv % sp`` ranks one more (`check_sequence_parallel`)."""
    if not 1 <= sp <= num_kv_heads:
        raise ConfigError(f"sequence_parallel_size={sp} cannot split {num_kv_heads} KV heads")
    base, extra = divmod(num_kv_heads, sp)
    return HeadSplit(tuple(base + (j < extra) for j in range(sp)), num_heads // num_kv_heads)


def to_heads(
    sp: SequenceParallelGroup, split: HeadSplit, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence- to head-sharded: ``q [Hq, S, d]``, ``k``, ``v`` ``[Hkv, S, d]`` of this rank's segment ->
    its heads over every segment, ``[Hq_j, sp * S, d]``, ``[Hkv_j, sp * S, d]`` x 2 (contiguous)."""
    s, d = q.shape[1], q.shape[2]
    parts = []
    for i in range(sp.size):
        q0, k0 = split.q_start(i), split.kv_start(i)
        kv = slice(k0, k0 + split.kv[i])
        parts += [q[q0 : q0 + split.q[i]], k[kv], v[kv]]
    send = [split.q[i] + 2 * split.kv[i] for i in range(sp.size)]
    mine = send[sp.rank]
    got = sp.all_to_all(torch.cat(parts).view(-1, s * d), send, [mine] * sp.size)
    got = got.view(sp.size, mine, s, d)
    hq, hkv = split.q[sp.rank], split.kv[sp.rank]

    def whole(lo: int, hi: int) -> torch.Tensor:  # [sp, H, S, d] -> [H, sp * S, d]
        return got[:, lo:hi].transpose(0, 1).reshape(hi - lo, sp.size * s, d)

    return whole(0, hq), whole(hq, hq + hkv), whole(hq + hkv, hq + 2 * hkv)


def to_sequence(sp: SequenceParallelGroup, split: HeadSplit, attn: torch.Tensor) -> torch.Tensor:
    """Head- to sequence-sharded: ``attn [Hq_j, sp * S, d]`` -> ``[Hq, S, d]``, this rank's segment."""
    hq_j, total, d = attn.shape
    s = total // sp.size
    x = attn.reshape(hq_j, sp.size, s, d).transpose(0, 1).reshape(sp.size * hq_j, s * d)
    out = sp.all_to_all(x, [hq_j] * sp.size, list(split.q))
    return out.view(sum(split.q), s, d)


def merge_partials(sp: SequenceParallelGroup, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Attention over the union of every rank's keys from each rank's partial result: ``out [B, Hq, d]``
    (normalised over its own keys) and ``lse`` float32 ``[B, Hq]`` (-inf: no keys here) -> ``[B, Hq, d]``
    in out's dtype, the same on every rank (one all-gather, a fixed order)."""
    packed = torch.cat([out.float(), lse[..., None]], dim=-1)  # [B, Hq, d + 1]
    every = sp.all_gather(packed)  # [sp, B, Hq, d + 1]
    return merge_by_lse(every[..., :-1], every[..., -1]).to(out.dtype)
