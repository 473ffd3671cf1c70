"""The engine core's policy-actor hooks (no Ray), on the tiny random Llama with the entropy policy: the head
statistics sink after each sparse prefill, a pinned head budget table (identity: today's tokens; a real
one: other budgets, its version in the stats and in the prefix-cache key), and a failing sink that never
fails a request."""

from __future__ import annotations

import dataclasses
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from entropyinfer.policies.head_budgets import HeadBudgetTable
from entropyinfer.policies.head_heatmap import request_heatmap
from entropyinfer.policies.head_stats import HeadStats, decode_stats, encode_stats
from entropyinfer.shard.head_report import StatsSinks
from entropyinfer.shard.llm import LLM
from entropyinfer.shard.sampling import SamplingParams

PROMPT = "".join(chr(97 + (i * 7) % 26) for i in range(900))  # ~900 byte tokens: 8 segments of 128


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(
        str(tiny_checkpoint), load_format="dummy", device="cpu", warm_up_kernels=False, policy="entropy"
    )


def _run(llm: LLM, rid: str, table: HeadBudgetTable | None = None, prompt: str = PROMPT) -> dict:
    req = llm.request(rid, prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    llm.submit(dataclasses.replace(req, head_budgets=table))
    while True:
        llm.step()
        for ev in llm.take_events(rid):
            if hasattr(ev, "output"):
                return {"ids": ev.output.token_ids, **ev.output.stats}


def test_the_sink_gets_each_sparse_prefills_head_stats(llm: LLM, tmp_path: Path) -> None:
    got: list[tuple[str, HeadStats]] = []
    llm.core.sinks = StatsSinks("tiny", heads=lambda rid, st: got.append((rid, st)))
    try:
        out = _run(llm, "r1")
    finally:
        llm.core.sinks = StatsSinks()
    assert [rid for rid, _ in got] == ["r1"]
    st = got[0][1]
    assert st.model == "tiny" and st.shape == (2, 2) and st.table_version == 0
    assert st.seq_len == llm.count_tokens(PROMPT)
    assert st.profiled.tolist() == [False, True]  # layer 0 runs dense
    sparse = st.sparse_mask()[1]
    assert sparse.any() and st.dense[0] and st.dense[-1]
    assert (st.counts[1][:, sparse] > 0).all() and np.isfinite(st.entropy[1][:, sparse]).all()
    cap = st.captured[1][:, sparse]
    assert ((cap > 0) & (cap <= 1)).all()
    assert out["head_table_version"] == 0
    llm.core.sinks = StatsSinks(heads=lambda rid, st: got.append((rid, st)))
    try:  # prompts of one segment or too short to run sparse: answered, nothing reported
        for i, n in enumerate((5, 127, 128, 300)):
            assert len(_run(llm, f"short{i}", prompt=PROMPT[:n])["ids"]) == 2
    finally:
        llm.core.sinks = StatsSinks()
    assert len(got) == 1
    back = decode_stats(encode_stats(st))  # what goes on the wire
    assert np.array_equal(back.counts, st.counts)
    png = request_heatmap(st, out=tmp_path / "req.png")  # the Python API's picture of one request
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "req.png").read_bytes() == png
    assert struct.unpack(">II", png[16:24]) == (3 * 2 * 12 + 4 * 8, 2 * 12 + 16)  # 3 panels, 2 x 2 cells


def test_a_pinned_table_scales_the_budgets_and_keys_the_prefix_cache(llm: LLM) -> None:
    base = _run(llm, "t0")
    same = _run(llm, "t1", HeadBudgetTable.identity("tiny", 2, 2))  # version 0: no table
    assert same["ids"] == base["ids"] and same["density"] == base["density"]
    scales = np.ones((2, 2), dtype=np.float32)
    scales[1] = [0.25, 2.0]
    hits = llm.core.pages.cache.hit_tokens
    scaled = _run(llm, "t2", HeadBudgetTable("tiny", 1, scales))
    assert scaled["head_table_version"] == 1
    assert scaled["density"] != base["density"]
    assert llm.core.pages.cache.hit_tokens == hits  # version 1 does not read version 0's pages
    again = _run(llm, "t3", HeadBudgetTable("tiny", 1, scales))
    assert llm.core.pages.cache.hit_tokens > hits and again["density"] == pytest.approx(scaled["density"])


def test_a_failing_sink_never_fails_a_request_and_logs_once(
    llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(rid: str, st: HeadStats) -> None:
        raise RuntimeError("sink down")

    llm.core.sinks = StatsSinks(heads=broken)
    try:
        with caplog.at_level(logging.ERROR, logger="entropyinfer.shard.engine_core"):
            outs = [_run(llm, f"f{i}", prompt=PROMPT[: 899 - i]) for i in range(3)]
    finally:
        llm.core.sinks = StatsSinks()
    assert all(len(o["ids"]) == 2 for o in outs)
    assert sum("head statistics sink failed" in r.getMessage() for r in caplog.records) == 1
