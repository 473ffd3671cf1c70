"""A sparse prefill's per-request head statistics (`policies.head_stats.HeadStats`), read from its attention
object after the prompt's last chunk, and `StatsSinks`, where the engine core hands them.

What is read (`SparsePrefill`): per profiled layer the entropy the budget rule used (spread entropy in mode
`spread`, else the block entropy), the blocks kept, the rigid test after the last segment, and with
``collect_mass`` the captured-mass proxy (`policies/head_scaling.py`); segments a prefix-cache hit did not
prefill here have NaN captured mass. One device-to-host copy per layer, after the prefill (the engine core
reports only when a sink is installed: no cost otherwise). No Ray here: the sink is any callable; the
shard actor's (`cluster/policy_actor.py`) queues the stats for the policy actor and returns at once.
`KeptStatsSink` is its twin for where a sequence's first compression kept prompt positions
(`policies/segment_shares.KeepStats`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from entropyinfer.kernels.block_selection_ref import dense_segment_mask
from entropyinfer.policies.head_stats import HeadStats
from entropyinfer.policies.segment_shares import KeepStats
from entropyinfer.shard.sparse_attention import SparsePrefill

if TYPE_CHECKING:
    from entropyinfer.shard.attention import PrefillAttention
    from entropyinfer.shard.sequence import SequenceRequest

__all__ = ["HeadStatsSink", "KeptStatsSink", "StatsSinks", "head_stats", "pinned_head_table"]

HeadStatsSink = Callable[[str, HeadStats], None]  # (request id, stats)
KeptStatsSink = Callable[[str, KeepStats], None]  # (request id, where the first compression kept positions)


@dataclass
class StatsSinks:
    """The policy actor's hooks on one engine core (`EngineCore.sinks`; the Serve shard installs its policy
    client's, `cluster/shard_actor.py`): `heads` takes a request's head statistics after its sparse prefill,
    `kept` where its first compression by an exact plan kept the prompt's positions; `model` labels both.
    None: not collected (and not computed). A failing sink is logged once and never fails a request."""

    model: str = ""
    heads: HeadStatsSink | None = None
    kept: KeptStatsSink | None = None
    _failed: bool = field(default=False, repr=False)

    def report_heads(
        self,
        request_id: str,
        attention: SparsePrefill,
        gathered: HeadStats | None,
        shape: tuple[int, int] | None,
    ) -> None:
        """One rank (``shape``: the model's layers and KV heads): the stats read from `attention`; a group
        (``shape`` None): what the executor gathered from every rank, `gathered`."""
        if self.heads is None:
            return
        try:
            if shape is not None:
                stats = head_stats(attention, self.model, *shape)
            else:
                stats = None if gathered is None else dataclasses.replace(gathered, model=self.model)
            if stats is not None:
                self.heads(request_id, stats)
        except Exception:
            self._failure("head statistics")

    def report_kept(self, request_id: str, kept: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """`kept` (a sequence's kept-position histogram and weights, CPU tensors) to the `kept` sink."""
        if self.kept is None or kept is None:
            return
        try:
            self.kept(request_id, KeepStats(self.model, kept[0].numpy(), kept[1].numpy()))
        except Exception:
            self._failure("kept-position statistics")

    def _failure(self, what: str) -> None:
        if not self._failed:  # once for both sinks: they feed the same policy client
            self._failed = True
            logging.getLogger(__name__).exception("%s sink failed (logged once)", what)


def head_stats(attention: SparsePrefill, model: str, num_layers: int, num_kv_heads: int) -> HeadStats | None:
    """The statistics of the prompt `attention` just prefilled (None: not profiled, or too short to run
    sparse)."""
    records = attention.profiled
    n = attention.seq_len
    if not records or n is None:
        return None
    cfg = attention.layer_config or attention.config
    s_len, b = cfg.segment_size, cfg.block_size
    nseg = -(-n // s_len)
    entropy = np.full((num_layers, num_kv_heads, nseg), np.nan, dtype=np.float32)
    counts = np.zeros((num_layers, num_kv_heads, nseg), dtype=np.int32)
    captured = np.full((num_layers, num_kv_heads, nseg), np.nan, dtype=np.float32)
    rigid = np.zeros((num_layers, num_kv_heads), dtype=bool)
    profiled = np.zeros(num_layers, dtype=bool)
    for layer, rec in records.items():
        if layer >= num_layers or rec.entropy.shape[0] != num_kv_heads:
            return None  # another rank's share of the heads (tensor parallel): not reported here
        source = rec.spread if rec.spread is not None else rec.entropy
        segs = min(source.shape[1], nseg)
        profiled[layer] = True
        entropy[layer, :, :segs] = source[:, :segs].float().cpu().numpy()
        counts[layer, :, :segs] = rec.counts[:, :segs].cpu().numpy()
        if rec.rigid is not None:
            rigid[layer] = rec.rigid.cpu().numpy()
        parts = attention.captured.get(layer)
        if parts:
            mass = torch.cat(parts, dim=1).float().cpu().numpy()
            captured[layer, :, nseg - mass.shape[1] :] = mass[:, -nseg:]
    dense = dense_segment_mask(n, s_len, cfg.threshold_len, "cpu").numpy().astype(bool)
    return HeadStats(
        model=model,
        seq_len=n,
        segment_size=s_len,
        block_size=b,
        profiled=profiled,
        entropy=entropy,
        counts=counts,
        captured=captured,
        rigid=rigid,
        dense=dense,
        table_version=attention.table_version,
        mode=cfg.mode if attention.policy == "entropy" else attention.policy,
    )


def pinned_head_table(attention: PrefillAttention, req: SequenceRequest) -> tuple[torch.Tensor, int] | None:
    """The whole model's head budget table pinned for a prompt (scales ``[L, Hkv]``, version), if any: what
    the other ranks of a group pin their heads' rows of."""
    table = req.head_budgets
    if isinstance(attention, SparsePrefill) and attention.table_version and table is not None:
        return torch.from_numpy(table.scales), table.version
    return None
