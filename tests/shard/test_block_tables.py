"""Device block tables (`shard/block_tables.py`) on the CPU: they equal the padded host tables after every
change, only new columns are written, a steady batch copies no row, and staged writes (`StepInputs`) land
after the upload exactly as direct ones."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.block_tables import BatchTables
from entropyinfer.shard.kv_pages import KVPages
from entropyinfer.shard.step_inputs import StepInputs

CPU = torch.device("cpu")
ARCH = ModelArch.from_hf_config(
    dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
)  # fmt: skip


def padded(block_table: list[list[int]]) -> torch.Tensor:
    """The reference: int32 [Hkv, max pages], each head padded with its last page."""
    width = max(len(t) for t in block_table)
    return torch.tensor([t + [t[-1]] * (width - len(t)) for t in block_table], dtype=torch.int32)


def seq(table: list[list[int]]) -> SimpleNamespace:
    return SimpleNamespace(block_table=table, table_cache=None)


def test_a_growing_table_writes_only_its_new_columns_and_doubles_its_capacity() -> None:
    tables, s = BatchTables(2, CPU), seq([[3], [7]])
    assert torch.equal(tables.table(s), padded(s.block_table))
    for page in range(40):  # past the first capacity (16) and the second (32)
        s.block_table[0].append(100 + page)
        s.block_table[1].append(200 + page)
        assert torch.equal(tables.table(s), padded(s.block_table))
    t = s.table_cache
    assert t.writes == 41 and t.data.shape[1] == 64
    before = t.view()
    assert tables.table(s) is before and t.writes == 41  # nothing changed: no write, the same tensor


def test_heads_of_different_lengths_are_padded_with_their_own_last_page() -> None:
    tables, s = BatchTables(3, CPU), seq([[1, 2], [3], [4, 5, 6]])
    assert torch.equal(tables.table(s), padded(s.block_table))
    s.block_table[1] += [8, 9, 10]  # the shortest head becomes the longest
    assert torch.equal(tables.table(s), padded(s.block_table))
    s.block_table[0].append(11)
    assert torch.equal(tables.table(s), padded(s.block_table))


def test_a_steady_batch_copies_no_row_and_returns_the_same_tensor() -> None:
    tables = BatchTables(2, CPU)
    seqs = [seq([[i, 10 + i], [20 + i, 30 + i]]) for i in range(3)]
    first = tables.batch(seqs)
    want = torch.stack([padded(s.block_table) for s in seqs])
    assert torch.equal(first, want) and tables.row_copies == 3
    assert tables.batch(seqs) is first and tables.row_copies == 3
    seqs[1].block_table[0].append(40)  # one head of one sequence grows past the batch's width
    grown, width = tables.batch(seqs), 3
    assert grown is not first and grown.shape == (3, 2, width)
    for i, s in enumerate(seqs):
        row = padded(s.block_table)
        assert torch.equal(grown[i, :, : row.shape[1]], row)
        assert torch.equal(grown[i, :, row.shape[1] :], row[:, -1:].expand(-1, width - row.shape[1]))
    assert tables.row_copies == 6  # the width changed: every row's padding
    seqs[1].block_table[1].append(41)  # within the width: that row only
    again = tables.batch(seqs)
    assert tables.row_copies == 7 and torch.equal(again[1], padded(seqs[1].block_table))
    assert torch.equal(
        tables.batch(seqs[::-1])[0, :, :2], padded(seqs[2].block_table)
    )  # rows follow the order


def test_staged_writes_land_after_the_upload_as_direct_ones() -> None:
    direct, staged = BatchTables(2, CPU), BatchTables(2, CPU)
    a, b = seq([[1], [2]]), seq([[3], [4]])
    a2, b2 = seq([[1], [2]]), seq([[3], [4]])
    inputs = StepInputs(CPU, copies=True)  # a separate "device" buffer even on the CPU
    for step in range(20):
        for s in (a, b, a2, b2):
            if step % 3 == 0:
                s.block_table[step % 2].append(50 + step)
        want = direct.batch([a, b]).clone()
        inputs.begin()
        tok = inputs.longs([step, step + 1])
        got = staged.batch([a2, b2], inputs)
        views = inputs.upload()
        assert views[tok].tolist() == [step, step + 1]
        assert torch.equal(got, want), step
    assert inputs.uploads == 20


def test_kv_pages_tables_follow_allocation_growth_and_reassignment() -> None:
    pages = KVPages(ARCH, 64, 4, CPU, torch.float32)
    s = SimpleNamespace(block_table=[], table_cache=None, kv_lengths=None, cached_names=[], request_id="r")
    pages.allocate(s, 6)
    assert torch.equal(pages.device_table(s), padded(s.block_table))
    s.kv_lengths.fill_(8)
    assert pages.grow(s, 1)
    assert torch.equal(pages.batch_tables([s])[0], padded(s.block_table))
    pages.free(s)
    assert s.table_cache is None
    pages.allocate_heads(s, [1, 3])  # compression: heads of their own lengths, a new table
    assert torch.equal(pages.device_table(s), padded(s.block_table))
