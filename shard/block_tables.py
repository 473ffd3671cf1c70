"""Block tables on the device, kept up to date by writing only what changed (`KVPages.device_table`,
`KVPages.batch_tables`).

A sequence's `DeviceTable` is int32 ``[Hkv, capacity]`` on the device whose first ``width`` columns are its
block table: head h's pages, then its last page repeated up to the widest head's page count. Pages are only
appended between reassignments (`KVPages.allocate` / `allocate_heads` / `free` drop the table:
``Sequence.table_cache = None``), so an update writes only the columns from the first one that changed: a
decode step that crosses a page boundary writes one column per head, not the whole table (8192 page ids per
head at 128k tokens). The capacity doubles when the table outgrows it (a device copy of what is written).

`BatchTables` keeps a decode batch's ``[B, Hkv, W]`` in one device buffer: row i is copied again only when
its sequence changed (another table in that row, or the table written since) or the batch got wider, so a
steady batch costs no copy at all. A batch of one is the sequence's own table. The tensor returned is the
same object as the step before when nothing changed (`PagedDecoder` then skips copying it into a graph's
input buffer) and a new one otherwise.

Writes go straight to the device (a small copy), or with a `StepInputs` (`shard/step_inputs.py`) into the
decode step's one host-to-device copy, applied right after it together with the batch's row copies.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from entropyinfer.shard.step_inputs import StepInputs

if TYPE_CHECKING:
    from entropyinfer.shard.sequence import Sequence

MIN_CAPACITY = 16  # page ids per head of a new table
_uids = itertools.count(1)


def _capacity(width: int, at_least: int) -> int:
    return max(MIN_CAPACITY, at_least, 1 << max(width - 1, 0).bit_length())


class DeviceTable:
    """One sequence's block table on the device (see the module docstring)."""

    def __init__(self, heads: int, device: torch.device) -> None:
        self.heads, self.device = heads, device
        self.data: torch.Tensor | None = None  # int32 [heads, capacity]
        self.pages = [0] * heads  # page ids of each head written
        self.width = 0  # columns written (the widest head's pages)
        self.uid = next(_uids)
        self.version = 0  # bumped by every write
        self.writes = 0  # columns-blocks written (tests)
        self._view: torch.Tensor | None = None

    def view(self) -> torch.Tensor:
        """int32 ``[Hkv, width]``: the same object until the next write."""
        if self._view is None:
            assert self.data is not None
            self._view = self.data[:, : self.width]
        return self._view

    @torch.inference_mode()
    def update(self, block_table: list[list[int]], stage: StepInputs | None = None) -> torch.Tensor:
        """Bring the device copy up to `block_table` (pages appended since the last update); with `stage`
        the new entries are written right after its upload. Returns `view`."""
        pages = [len(t) for t in block_table]
        if pages == self.pages and self.data is not None:
            return self.view()
        width = max(pages)
        if any(n < m for n, m in zip(pages, self.pages, strict=True)):
            raise ValueError(f"pages only grow between reassignments: {self.pages} -> {pages}")
        # a head that grew rewrites from its old end (its padding); every head the new columns
        start = min([m for n, m in zip(pages, self.pages, strict=True) if n != m] + [self.width])
        cap = 0 if self.data is None else self.data.shape[1]
        if self.data is None or width > cap:
            data = torch.empty(self.heads, _capacity(width, 2 * cap), dtype=torch.int32, device=self.device)
            if self.data is not None and self.width:
                data[:, : self.width].copy_(self.data[:, : self.width])
            self.data = data
        assert self.data is not None
        rows = [t[start:] + [t[-1]] * (width - max(len(t), start)) for t in block_table]
        dst = self.data[:, start:width]
        if stage is None:
            dst.copy_(torch.tensor(rows, dtype=torch.int32))
        else:
            stage.write(dst, rows)
        self.pages, self.width = pages, width
        self.version += 1
        self.writes += 1
        self._view = None
        return self.view()


class BatchTables:
    """The decode batch's block tables in one device buffer (see the module docstring)."""

    def __init__(self, heads: int, device: torch.device) -> None:
        self.heads, self.device = heads, device
        self.data: torch.Tensor | None = None  # int32 [rows, heads, width capacity]
        self._held: list[tuple[int, int] | None] = []  # (table uid, version) each row holds
        self._width = 0  # columns every row holds (padding included)
        self._view: torch.Tensor | None = None
        self._single: tuple[torch.Tensor, torch.Tensor] | None = None  # a batch of one: (view, [1, Hkv, W])
        self.row_copies = 0  # rows copied into the buffer (tests)

    def table(self, seq: Sequence, stage: StepInputs | None = None) -> torch.Tensor:
        """`seq`'s `DeviceTable`, up to date: int32 ``[Hkv, pages]``, each head padded with its last page."""
        if seq.table_cache is None:
            seq.table_cache = DeviceTable(len(seq.block_table), self.device)
        return seq.table_cache.update(seq.block_table, stage)

    @torch.inference_mode()
    def batch(self, seqs: list[Sequence], stage: StepInputs | None = None) -> torch.Tensor:
        """int32 ``[B, Hkv, max pages]`` of a decode batch, each row padded with its heads' last pages
        (valid after `stage`'s upload when one is given)."""
        tables: list[DeviceTable] = []
        for s in seqs:
            self.table(s, stage)
            assert s.table_cache is not None
            tables.append(s.table_cache)
        if len(tables) == 1:
            view = tables[0].view()
            if self._single is None or self._single[0] is not view:
                self._single = (view, view[None])
            return self._single[1]
        b, width = len(tables), max(t.width for t in tables)
        data = self.data
        rows, cap = (0, 0) if data is None else (data.shape[0], data.shape[2])
        if data is None or b > rows or width > cap:
            shape = (_capacity(b, rows), self.heads, _capacity(width, 2 * cap if width > cap else cap))
            data = self.data = torch.empty(shape, dtype=torch.int32, device=self.device)
            self._held = [None] * shape[0]
        if width != self._width:  # every row's padding changes
            self._held = [None] * len(self._held)
            self._width = width
        stale = [i for i, t in enumerate(tables) if self._held[i] != (t.uid, t.version)]
        if stale or self._view is None or self._view.shape[0] != b:
            self._view = data[:b, :, :width]
        if stale:

            def copy_rows() -> None:
                for i in stale:
                    t = tables[i]
                    data[i, :, : t.width].copy_(t.view())
                    if t.width < width:
                        data[i, :, t.width : width].copy_(t.view()[:, -1:].expand(-1, width - t.width))

            if stage is None:
                copy_rows()
            else:
                stage.after_upload(copy_rows)
            for i in stale:
                self._held[i] = (tables[i].uid, tables[i].version)
            self.row_copies += len(stale)
        return self._view
