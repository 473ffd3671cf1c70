"""Piecewise prefill graphs (`shard/prefill_graphs.py`) on a tiny random model: chunks run on the static
buffers give every request the tokens, block counts and prefix-cache hits of the eager path, for every
policy, with chunks of sizes that are not a set's size (rows past the chunk) and chunks longer than the
largest set (eager). On the CPU the static buffers run without graphs (`prefill_graphs=True`); on CUDA
(fp32) they are captured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entropyinfer import LLM, SamplingParams
from entropyinfer.shard import prefill_graphs
from entropyinfer.shard.prefill_graphs import PREFILL_GRAPH_SIZES, PrefillGraphs

SPARSE = dict(segment_size=64, block_size=8, threshold_len=64, base_budget=32, fixed_budget=32)
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
# chunks of 192 (a set of 256: 64 rows past the chunk), whole prompts of 20-700 tokens
PROMPTS = ["alpha " * 3, "beta gamma " * 18, "delta " * 60, "epsilon zeta " * 35, "eta " * 170]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def llms(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> dict[bool, LLM]:
    kw = dict(load_format="dummy", warm_up_kernels=False, device=request.param, dtype="float32")
    kw.update(SPARSE, max_num_batched_tokens=192, num_kv_pages=512, kv_page_size=16)
    return {on: LLM(str(tiny_checkpoint), prefill_graphs=on, **kw) for on in (False, True)}  # type: ignore[arg-type]


def test_the_static_buffers_exist_only_when_asked(llms: dict[bool, LLM]) -> None:
    assert llms[False].engine.prefill_graphs is None
    graphs = llms[True].engine.prefill_graphs
    assert isinstance(graphs, PrefillGraphs) and graphs.sizes == PREFILL_GRAPH_SIZES
    assert [graphs.size_for(n) for n in (1, 16, 17, 192, 512, 513)] == [16, 16, 32, 256, 512, None]
    graphs.capture_all()  # what build_engine runs at start-up: every size, whatever the token budget
    assert sorted(graphs.sets) == list(PREFILL_GRAPH_SIZES)
    layers = len(llms[True].engine.model.layers)
    for size, graph_set in graphs.sets.items():
        assert graph_set is not None and graph_set.h.shape[0] == size
        captured = llms[True].engine.device.type == "cuda"  # on the CPU the same buffers, no graphs
        assert len(graph_set.inputs) == len(graph_set.outputs) == (layers if captured else 0)


@pytest.mark.parametrize("policy", ["dense", "entropy", "fixed"])
def test_a_chunked_batch_gives_the_eager_tokens_and_blocks(llms: dict[bool, LLM], policy: str) -> None:
    graphs = llms[True].engine.prefill_graphs
    assert graphs is not None
    before = graphs.replayed_chunks
    outs = {on: llm.generate(PROMPTS, PARAMS, policy=policy) for on, llm in llms.items()}
    assert graphs.replayed_chunks > before
    for eager, static in zip(outs[False], outs[True], strict=True):
        assert static.token_ids == eager.token_ids
        assert static.stats.get("density") == eager.stats.get("density")
        assert static.stats.get("budget_tokens") == eager.stats.get("budget_tokens")


def test_a_prefix_cache_hit_gives_the_same_tokens(llms: dict[bool, LLM]) -> None:
    doc = "the quick brown fox " * 16  # ~320 tokens: sparse segments, cached pages
    runs = {}
    for on, llm in llms.items():
        first = llm.generate(doc + "first?", PARAMS, policy="entropy")[0]
        second = llm.generate(doc + "second?", PARAMS, policy="entropy")[0]
        runs[on] = (first, second)
        assert second.stats["cached_tokens"] > 0
    assert [o.token_ids for o in runs[True]] == [o.token_ids for o in runs[False]]
    assert runs[True][1].stats["cached_tokens"] == runs[False][1].stats["cached_tokens"]


def test_a_size_whose_set_fails_to_build_runs_eagerly(
    llms: dict[bool, LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that fails (out of memory once the KV pool took the device, say) leaves that size eager for
    good: the request is served, with the eager path's tokens."""
    llm = llms[True]
    graphs = llm.engine.prefill_graphs
    assert graphs is not None
    saved = dict(graphs.sets)

    def fail(*args: object, **kw: object) -> None:
        raise RuntimeError("injected capture failure")

    try:
        graphs.sets.clear()
        monkeypatch.setattr(prefill_graphs, "GraphSet", fail)
        out = llm.generate(PROMPTS[1], PARAMS, policy="dense")[0]
        assert out.token_ids == llms[False].generate(PROMPTS[1], PARAMS, policy="dense")[0].token_ids
        assert graphs.sets and all(v is None for v in graphs.sets.values())
        assert graphs.get(100) is None  # not tried again
    finally:
        graphs.sets.clear()
        graphs.sets.update(saved)
