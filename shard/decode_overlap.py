"""Overlapped decode: a greedy decode step is launched before the previous step's tokens are read back.

A decode step ends with the host waiting for the GPU: the sampled ids come back, the text is detokenized,
stop rules run, the scheduler builds the next step and its inputs are staged, and all the while the GPU is
idle (about 0.5 ms a step at 32k on an H200, 8% of an 8B model's step). With `EngineConfig.async_decode`
the core instead keeps the step `InFlight`: its greedy ids stay on the device, the next step is scheduled
as if every sequence goes on, and its token inputs are copied from those ids on the device, so it is queued
behind the running step before the host reads that step's ids back (SGLang's overlap scheduler, vLLM's
async scheduling).

A step may stay in flight only when nothing on the host needs its logits or its ids before the next
launch (`deferrable`): every sequence greedy, without logprobs, observation window or replayed tokens,
and not at its last token (a sequence that stops on `max_tokens` ends in its own step, not one later). A
sequence that stops on a stop token is still in the next step, whose result for it is dropped; the pages
it frees serve later steps in stream order. The next step feeds from the device only if it decodes the
in-flight step's sequences first, in order (the scheduler keeps `running` in admission order); otherwise
(a cancel, a preemption) the in-flight step is landed before the next one is launched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropyinfer.shard.sequence import Sequence


@dataclass
class InFlight:
    """A launched decode step whose tokens are still on the device: `host` receives them (a pinned copy
    queued right after the step, so reading it waits for this step only, not for the next one queued
    behind it on the stream; on the CPU, the ids themselves)."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # int64 [len(seqs)] greedy ids, on the device
    host: torch.Tensor
    ready: torch.cuda.Event | None
    started: float  # perf_counter when its launch began

    def ids(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return [int(t) for t in self.host.tolist()]


class ReadBack:
    """Copies of a step's ids into one of two pinned host buffers (a step's buffer is read before the
    step after next reuses it)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def start(self, seqs: list[Sequence], tokens: torch.Tensor, started: float) -> InFlight:
        if tokens.device.type != "cuda":
            return InFlight(seqs, tokens, tokens, None, started)
        self._turn ^= 1
        buf, n = self._buffers[self._turn], tokens.numel()
        if buf is None or buf.numel() < n:
            buf = self._buffers[self._turn] = torch.empty(max(64, 2 * n), dtype=tokens.dtype, pin_memory=True)
        host = buf[:n]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return InFlight(seqs, tokens, host, ready, started)


def deferrable(seqs: list[Sequence], fed: int) -> bool:
    """Whether a just-launched step of `seqs` may stay in flight (see the module docstring). Called before
    the launched step is counted (``decode_steps`` does not include it yet); the first `fed` sequences also
    have the in-flight step's token still out of ``output_ids``."""
    for i, s in enumerate(seqs):
        p = s.params
        if not p.greedy or s.logprobs is not None or s.obs_row is not None:
            return False
        tokens = len(s.output_ids) + (i < fed)  # with the one in flight
        if s.decode_steps + 1 != tokens or tokens + 1 >= p.max_tokens:
            return False  # a replayed token (after a recompute), or its last token
    return True


def feeds_from(flight: InFlight | None, seqs: list[Sequence]) -> int:
    """How many of the step's first inputs come from `flight`'s ids on the device (0: none; land it first)."""
    if flight is None:
        return 0
    n = len(flight.seqs)
    return n if len(seqs) >= n and all(a is b for a, b in zip(seqs, flight.seqs, strict=False)) else 0
