"""The two splits of a sequence-parallel sequence's compression capacity over its SP ranks
(`shard/parallel/sp_compress.py`), on gloo ranks: the exact one (the global top ``C - W``, the whole score
row all-gathered) and the learned one (each rank its own top ``b_j`` by a share; only the log-sum-exp and
the pooling edges exchanged). Random window probabilities over ragged spans (a span shorter than the
pooling edge, an empty one, a window that straddles two spans), every pooling and group reduce."""

from __future__ import annotations

import dataclasses

import torch
from spawning import spawn

from entropyinfer.policies.config import KVCompressionConfig
from entropyinfer.policies.kv_compression import prefix_scores, select_positions
from entropyinfer.policies.segment_split import split_budget
from entropyinfer.shard.parallel.all_to_all import SequenceParallelGroup
from entropyinfer.shard.parallel.sp_compress import _exact, _Layer, _learned

H, G, W, CAP = 3, 2, 4, 24
CONFIGS = [
    KVCompressionConfig(window=W, gap=2, capacity=CAP, pooling="avg", kernel_size=5),
    KVCompressionConfig(window=W, gap=2, capacity=CAP, pooling="max", kernel_size=3, group_reduce="mean"),
    KVCompressionConfig(window=W, gap=2, capacity=CAP, pooling="none"),
]


@dataclasses.dataclass(frozen=True)
class CountingGroup(SequenceParallelGroup):
    """A real gloo SP group that records the elements each all-gather sends."""

    sent: list[int] = dataclasses.field(default_factory=list)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.sent.append(x.numel())
        return super().all_gather(x)


def spans_for(sp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global lengths [H] and ragged contiguous spans (starts, counts) [sp, H] that cover them."""
    lengths = torch.tensor([70, 53, 61])
    if sp == 2:
        counts = torch.tensor([[40, 50, 58], [30, 3, 3]])  # head 1, 2: the window straddles both spans
    else:
        counts = torch.tensor([[30, 1, 20], [1, 50, 0], [39, 2, 41]])  # spans of 1 and 0 tokens
    starts = torch.cumsum(counts, 0) - counts
    assert (counts.sum(0) == lengths).all()
    return lengths, starts, counts


def layer_of(sp: SequenceParallelGroup, whole: torch.Tensor, lengths, starts, counts) -> _Layer:
    """This rank's `_Layer`: its span of `whole` [H, G, T], padded with junk the split must ignore."""
    widest = int(counts.max())
    probs = torch.full((H, G, widest), 7.0)
    for h in range(H):
        a, n = int(starts[sp.rank, h]), int(counts[sp.rank, h])
        probs[h, :, :n] = whole[h, :, a : a + n]
    return _Layer(torch.zeros(H, widest, 1), starts, counts, lengths, probs)


def _ranks(sp: CountingGroup, seed: int) -> None:
    lengths, starts, counts = spans_for(sp.size)
    prefix = lengths - lengths.clamp(max=W)
    room = (torch.minimum(starts + counts, prefix) - starts).clamp(min=0).minimum(counts)
    cap = torch.tensor([CAP, CAP, 12])
    slots = int(torch.minimum(cap, lengths).max())
    for ci, kv in enumerate(CONFIGS):
        g = torch.Generator().manual_seed(seed + ci)
        whole = torch.rand(H, G, int(lengths.max()), generator=g) ** 4  # peaked, as attention is
        x = layer_of(sp, whole, lengths, starts, counts)
        sp.sent.clear()
        local, exact_counts, plan = _exact(sp, x, cap, slots, kv)
        exact_sent = sum(sp.sent)
        # the exact split is one rank's plan on the whole row
        ref = select_positions(
            prefix_scores(whole, lengths, W, pooling=kv.pooling, kernel_size=kv.kernel_size,
                          group_reduce=kv.group_reduce),
            lengths, cap, W, slots,
        )  # fmt: skip
        assert torch.equal(plan.indices, ref.indices) and torch.equal(plan.counts, ref.counts)
        assert torch.equal(exact_counts.sum(0), ref.counts)

        # learned with the exact split's own budgets as shares: the same kept positions on every rank
        oracle = (exact_counts - (counts - room)).double()
        sp.sent.clear()
        got, got_counts = _learned(sp, x, cap, oracle, slots, kv)
        assert torch.equal(got_counts, exact_counts), kv
        me = sp.rank
        scores = prefix_scores(
            whole, lengths, W, pooling=kv.pooling, kernel_size=kv.kernel_size, group_reduce=kv.group_reduce
        )
        for h in range(H):
            n, a = int(exact_counts[me, h]), int(starts[me, h])
            if kv.pooling == "max":  # equal scores at the cut (max pooling repeats values): by value
                assert torch.equal(scores[h, a + got[h, :n]], scores[h, a + local[h, :n]]), (kv, h)
            else:
                assert torch.equal(got[h, :n], local[h, :n]), (kv, h)
        k = kv.kernel_size // 2 if kv.pooling != "none" else 0
        assert sum(sp.sent) == H * G * 2 * k + sp.size * H, sp.sent  # the pooling edges and rank 0's budgets
        assert exact_sent == H * G * int(counts.max())

        # learned with other shares: each rank its `split_budget` of the prefix budget, its own top by the
        # whole row's pooled scores inside its span, then its window positions
        shares = torch.rand(sp.size, H, generator=g, dtype=torch.float64)
        got, got_counts = _learned(sp, x, cap, shares, slots, kv)
        total = torch.minimum(cap - W, prefix)
        budget = split_budget(total, shares, room)
        assert torch.equal(got_counts, budget + counts - room)
        assert torch.equal(got_counts.sum(0), ref.counts)  # the same tokens kept in all
        for h in range(H):
            a, r, b = int(starts[me, h]), int(room[me, h]), int(budget[me, h])
            mine = got[h, :b]
            assert torch.equal(mine, mine.unique()) and (mine < r).all(), (kv, h)  # ascending, in the room
            want = scores[h, a : a + r].topk(b).values.sort().values  # by value: max pooling makes ties
            assert torch.equal(scores[h, a + mine].sort().values, want), (kv, h)
            assert torch.equal(got[h, b : int(got_counts[me, h])], torch.arange(r, int(counts[me, h])))


def test_learned_split_with_the_exact_budgets_keeps_what_the_exact_split_keeps() -> None:
    for sp in (2, 3):
        spawn(sp, _ranks, 11 * sp, group=CountingGroup)
