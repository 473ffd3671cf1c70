"""One host-to-device copy per decode step: the step's small inputs packed into one host buffer.

A decode step needs a handful of small tensors on the device (token ids, positions, per-(layer, head)
lengths, observation rows and slots, and the block-table entries that changed). Made one by one, each is a
separate host-to-device copy from pageable memory, which the host waits for. `StepInputs` gathers them
instead: `begin`, then `longs` / `stack` / `write` record what the step needs, and `upload` packs it into
one host buffer (pinned on CUDA, so the copy is asynchronous), copies it to the device in one call and
returns device views of each part, in order. Table writes (`write(dst, rows)`) and the actions queued with
`after_upload` run right after the copy, on the device (`shard/block_tables.py`).

Two host and device buffer pairs alternate, so a step's views stay valid while the next step is staged;
they grow by doubling and are never shrunk. On the CPU nothing is copied: the views are the host buffer.
``uploads`` counts the copies made (tests read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

_ALIGN = 8  # every part starts at a multiple of 8 bytes (int64 views of the byte buffer)


class StepInputs:
    def __init__(self, device: torch.device, copies: bool | None = None) -> None:
        """`copies`: copy into a device buffer (default: unless the device is the CPU; tests force it)."""
        self.device = device
        self.copies = device.type != "cpu" if copies is None else copies
        self._host: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        self._dev: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        self._turn = 0
        self._parts: list[tuple[torch.dtype, tuple[int, ...], object]] = []
        self._writes: list[tuple[torch.Tensor, int]] = []  # (destination, index of its part)
        self._after: list[Callable[[], None]] = []
        self.uploads = 0  # host-to-device copies made

    def begin(self) -> None:
        """Start a step: forget what the previous one staged."""
        self._parts, self._writes, self._after = [], [], []

    def longs(self, values: Sequence[int]) -> int:
        """Stage int64 ``[len(values)]``; returns the index of its view in `upload`'s result."""
        return self._add(torch.int64, (len(values),), values)

    def stack(self, tensors: Sequence[torch.Tensor], dim: int) -> int:
        """Stage ``torch.stack(tensors, dim)`` of CPU tensors of one shape and dtype."""
        shape = list(tensors[0].shape)
        shape.insert(dim, len(tensors))
        return self._add(tensors[0].dtype, tuple(shape), (list(tensors), dim))

    def write(self, dst: torch.Tensor, rows: list[list[int]]) -> None:
        """After the upload, ``dst`` (an int32 device view of shape ``[len(rows), len(rows[0])]``) gets
        ``rows``."""
        self._writes.append((dst, self._add(torch.int32, tuple(dst.shape), rows)))

    def after_upload(self, action: Callable[[], None]) -> None:
        """Run `action` right after the upload and the staged writes (device work that reads them)."""
        self._after.append(action)

    def _add(self, dtype: torch.dtype, shape: tuple[int, ...], value: object) -> int:
        self._parts.append((dtype, shape, value))
        return len(self._parts) - 1

    @torch.inference_mode()
    def upload(self) -> list[torch.Tensor]:
        """Pack, copy once, run the staged writes and actions; the device views of the parts, in order
        (including those of `write`, which the caller need not use)."""
        offsets, total = [], 0
        for dtype, shape, _ in self._parts:
            offsets.append(total)
            nbytes = math.prod(shape) * _itemsize(dtype)
            total += -(-nbytes // _ALIGN) * _ALIGN
        self._turn ^= 1
        host, dev = self._buffers(total)
        for (dtype, shape, value), off in zip(self._parts, offsets, strict=True):
            view = _view(host, off, dtype, shape)
            if isinstance(value, tuple):  # (tensors, dim): a stack
                torch.stack(value[0], dim=value[1], out=view)
            elif view.numel():
                view.numpy()[...] = np.asarray(value, dtype=view.numpy().dtype).reshape(shape)
        if self.copies and total:
            dev[:total].copy_(host[:total], non_blocking=True)
            self.uploads += 1
        views = [
            _view(dev, off, dtype, shape) for (dtype, shape, _), off in zip(self._parts, offsets, strict=True)
        ]
        for dst, part in self._writes:
            dst.copy_(views[part])
        for action in self._after:
            action()
        self.begin()
        return views

    def _buffers(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This turn's host and device buffers, grown (doubling) to hold `nbytes`."""
        i = self._turn
        if self._host[i].numel() < nbytes:
            size = max(4096, 1 << (nbytes - 1).bit_length())
            host = torch.empty(size, dtype=torch.uint8)
            self._host[i] = host.pin_memory() if self.copies and self.device.type == "cuda" else host
            self._dev[i] = (
                torch.empty(size, dtype=torch.uint8, device=self.device) if self.copies else self._host[i]
            )
        return self._host[i], self._dev[i]


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    return buf[offset : offset + n * _itemsize(dtype)].view(dtype).view(shape)
