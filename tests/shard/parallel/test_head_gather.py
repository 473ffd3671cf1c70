"""Per-request head statistics under tensor and sequence parallelism (issue 13 item 1): rank 0 gathers every
rank's (layer, KV head, segment) statistics into the whole model's KV-head order, so the policy actor's sink
gets what one rank would report.

Unit: `gather_head_stats` over fake gathers (a sequence-parallel split of 3 KV heads as 2 + 1, then TP ranks
that replicate a KV head) puts the heads back in order and drops the replicas. Groups (gloo, CPU): TP=4 on
the tiny Llama (4 query / 2 KV heads: each KV head on two ranks, whose block logits are all-reduced) gives
one rank's greedy tokens and statistics under entropy; TP=2 x SP=2 on an 8 / 4-head Llama, with a prompt that
prefills split over the SP ranks and one that does not, too. A pinned head budget table (the policy actor's)
applies on every rank (its heads' rows) and gives one rank's tokens and density.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from entropyinfer import LLM, SamplingParams
from entropyinfer.policies.head_budgets import HeadBudgetTable
from entropyinfer.policies.head_stats import HeadStats
from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint
from entropyinfer.shard.head_report import StatsSinks
from entropyinfer.shard.parallel.head_gather import Part, gather_head_stats, pack

SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)
WIDE = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64,
    intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
)  # fmt: skip
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def text(n: int, seed: int) -> str:
    return "".join(chr(97 + (seed * 7 + i * (seed + 3) + i // 11) % 26) for i in range(n))


def stats(layers: int, heads: list[int], nseg: int) -> HeadStats:
    """Statistics whose every cell names its global KV head (entropy = head + segment / 100)."""
    h = np.array(heads, dtype=np.float32)[None, :, None]
    s = np.arange(nseg, dtype=np.float32)[None, None, :] / 100
    entropy = np.broadcast_to(h + s, (layers, len(heads), nseg)).copy()
    return HeadStats(
        model="", seq_len=nseg * 64, segment_size=64, block_size=8,
        profiled=np.array([False] + [True] * (layers - 1)), entropy=entropy,
        counts=(entropy * 10).astype(np.int32), captured=entropy / 10,
        rigid=np.broadcast_to(h[..., 0] % 2 == 1, (layers, len(heads))).copy(),
        dense=np.array([True] + [False] * (nseg - 2) + [True]),
    )  # fmt: skip


def test_gather_puts_sp_split_and_tp_replicas_in_global_head_order() -> None:
    """TP rank 1 of 2 whose 3 KV heads (3, 4, 5) its 2 SP ranks hold as 2 + 1; then TP ranks 0..3 with
    replicas (rank 1 repeats rank 0's heads): one row per global KV head 0..5."""
    layers, nseg = 2, 5
    sp_parts = [stats(layers, [3, 4], nseg), stats(layers, [5], nseg)]

    def over_sp(x: torch.Tensor) -> torch.Tensor:
        mine = [pack(p, layers, p.shape[1], nseg) for p in sp_parts]
        mine[1] = torch.nn.functional.pad(mine[1], (0, 0, 0, 1), value=float("nan"))
        assert x.shape == mine[0].shape  # this is SP rank 0 (NaN where it has no statistics)
        return torch.stack(mine)

    def over_tp(x: torch.Tensor) -> torch.Tensor:
        first = pack(stats(layers, [0, 1, 2], nseg), layers, 3, nseg)
        return torch.stack([first, first, x, x])  # ranks 0 / 1 and 2 / 3 replicate their heads

    parts = [Part(over_sp, (2, 1), (True, True)), Part(over_tp, (3, 3, 3, 3), (True, False, True, False))]
    got = gather_head_stats(sp_parts[0], layers, 2, nseg, parts)
    want = stats(layers, list(range(6)), nseg)
    assert got is not None and got.shape == (layers, 6)
    for field in ("entropy", "counts", "captured", "rigid", "profiled"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert got.entropy.dtype == np.float32 and got.counts.dtype == np.int32 and got.rigid.dtype == bool
    assert gather_head_stats(None, layers, 2, nseg, parts) is None


def collect(llm: LLM, prompts: list[str]) -> tuple[list[list[int]], list[HeadStats]]:
    """Each prompt's greedy tokens and the one report the sink got for it."""
    got: list[HeadStats] = []
    llm.core.sinks = StatsSinks("tiny", heads=lambda rid, st: got.append(st))
    ids = []
    try:
        for i, p in enumerate(prompts):
            ids.append(llm.generate([p], PARAMS)[0].token_ids)
            assert len(got) == i + 1, "one report per request"
    finally:
        llm.core.sinks = StatsSinks()
    return ids, got


def assert_same_stats(got: HeadStats, ref: HeadStats, what: str) -> None:
    assert got.model == "tiny" and got.shape == ref.shape and got.seq_len == ref.seq_len, what
    np.testing.assert_array_equal(got.profiled, ref.profiled, err_msg=what)
    np.testing.assert_array_equal(got.dense, ref.dense, err_msg=what)
    mask = np.broadcast_to(got.sparse_mask()[:, None, :], got.entropy.shape)  # [L, Hkv, nseg]
    assert mask.any(), f"{what}: nothing ran sparse"
    np.testing.assert_allclose(got.entropy[mask], ref.entropy[mask], atol=1e-4, err_msg=what)
    same = (got.counts == ref.counts).mean()
    assert same >= 0.99, f"{what}: {same:.3f} of the block counts equal one rank's"
    np.testing.assert_allclose(got.captured[mask], ref.captured[mask], atol=1e-3, err_msg=what)


def pinned(llm: LLM, rid: str, prompt: str, table: HeadBudgetTable) -> dict:
    """One request with the head budget table pinned: its tokens and stats."""
    req = llm.request(rid, prompt, PARAMS)
    llm.submit(dataclasses.replace(req, head_budgets=table))
    while True:
        llm.step()
        for ev in llm.take_events(rid):
            if hasattr(ev, "output"):
                return {"ids": ev.output.token_ids, **ev.output.stats}


def assert_table_applies(llm: LLM, one: LLM, prompts: list[str], kv_heads: int) -> None:
    """A table that halves some heads' budgets and doubles others' gives one rank's tokens and density on
    the group (each rank pinned its heads' rows), and another density than no table."""
    scales = np.ones((2, kv_heads), dtype=np.float32)
    scales[1] = [0.25, 2.0, 1.0, 0.5][:kv_heads]  # a different factor per head: rows pinned out of place show
    table = HeadBudgetTable("tiny", 3, scales)
    for i, prompt in enumerate(prompts):
        got, ref = pinned(llm, f"t{i}", prompt, table), pinned(one, f"t{i}", prompt, table)
        plain = pinned(one, f"p{i}", prompt, HeadBudgetTable.identity("tiny", 2, kv_heads))
        assert got["ids"] == ref["ids"] and got["head_table_version"] == ref["head_table_version"] == 3
        assert got["density"] == pytest.approx(ref["density"], abs=1e-3)
        assert ref["density"] != plain["density"]


def tiny(folder: Path, tp: int = 1, sp: int = 1) -> LLM:
    return LLM(
        str(folder), policy="entropy", load_format="dummy", device="cpu", warm_up_kernels=False,
        kv_page_size=8, kv_compression="none", tensor_parallel_size=tp, sequence_parallel_size=sp,
        sequence_parallel_min_tokens=512, **SPARSE,
    )  # fmt: skip


def test_tp4_replicas_report_one_ranks_head_stats_and_tokens(tiny_checkpoint: Path) -> None:
    prompts = [text(400, 1)]
    one = tiny(tiny_checkpoint)
    ref_ids, ref = collect(one, prompts)
    with tiny(tiny_checkpoint, tp=4) as llm:
        ids, got = collect(llm, prompts)
        assert_table_applies(llm, one, prompts, 2)
    assert ids == ref_ids
    assert_same_stats(got[0], ref[0], "tp=4")


def test_tp2_sp2_reports_one_ranks_head_stats(tmp_path: Path) -> None:
    wide = write_dummy_checkpoint(tmp_path / "wide", WIDE)
    prompts = [text(600, 2), text(300, 3)]  # split over the SP ranks, and whole on every rank
    one = tiny(wide)
    ref_ids, ref = collect(one, prompts)
    with tiny(wide, tp=2, sp=2) as llm:
        ids, got = collect(llm, prompts)
        assert_table_applies(llm, one, prompts, 4)  # SP prefill: each SP rank its part of the rows
    assert ids == ref_ids
    for g, r, what in zip(got, ref, ["sp prompt", "short prompt"], strict=True):
        assert_same_stats(g, r, what)
    assert got[0].shape == (2, 4)
