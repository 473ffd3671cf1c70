"""Column-, row- and vocab-parallel layers whose parameters load only this rank's slice.

nano-vllm's shape (`ColumnParallelLinear`, `RowParallelLinear`, `VocabParallelEmbedding`,
`ParallelLMHead`): every sharded parameter has a `ShardSpec` (in its layer's ``shard_specs``, by name),
the part of the full checkpoint tensor it holds, and `load_param(param, source, spec)` reads just that part
from a full tensor or a safetensors slice (`safe_open(...).get_slice(name)`, which reads only the rows /
columns asked for). Parameters without a spec are replicated: every rank loads them whole. With no group
(or a group of one) each layer computes exactly what the plain torch layer does.

- column-parallel (q/k/v, gate/up): output rows ``[start, start + size)`` of the weight (and bias); no
  communication (the model fuses q|k|v and gate|up per rank after loading).
- row-parallel (o, down): input columns ``[start, start + size)``; partial outputs are summed over the
  ranks (all-reduce); the bias is added once, on rank 0.
- vocab-parallel embedding / lm_head: ``ceil(V / tp)`` vocabulary rows per rank (the last rank's tail is
  zero padding); the embedding zeroes tokens of other ranks and all-reduces, the lm_head all-gathers the
  logits so that every rank returns the full ``[..., V]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from entropyinfer.errors import CheckpointNotFoundError
from entropyinfer.shard.parallel.group import TensorParallelGroup, rank_of, size_of


class TensorSource(Protocol):
    """A full checkpoint tensor to read from: a torch.Tensor or a safetensors slice."""

    def __getitem__(self, index: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class ShardSpec:
    """A parameter holds rows/columns ``[start, start + size)`` along `dim` of a `full_shape` tensor
    (`dim` None: the whole tensor). Where ``start + size`` passes the end, the parameter is zero-padded."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    size: int = 0


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """The spec of every sharded parameter of `model`, by parameter name (each parallel layer keeps its
    own in ``shard_specs``, which survives `to_empty`; parameters not named are replicated)."""
    out: dict[str, ShardSpec] = {}
    for prefix, module in model.named_modules():
        for name, spec in getattr(module, "shard_specs", {}).items():
            out[f"{prefix}.{name}" if prefix else name] = spec
    return out


def source_shape(src: TensorSource) -> tuple[int, ...]:
    shape = src.shape if isinstance(src, torch.Tensor) else src.get_shape()  # type: ignore[attr-defined]
    return tuple(int(s) for s in shape)


@torch.no_grad()
def load_param(param: torch.Tensor, src: TensorSource, spec: ShardSpec | None = None, name: str = "") -> None:
    """Copy this rank's part (`spec`; None: all) of the full tensor `src` into `param`, reading only it."""
    spec = spec or ShardSpec(tuple(param.shape))
    if source_shape(src) != spec.full_shape:
        raise CheckpointNotFoundError(
            f"checkpoint tensor {name!r} has shape {source_shape(src)}, expected {spec.full_shape}"
        )
    if spec.dim is None:
        param.copy_(src[tuple(slice(None) for _ in spec.full_shape)])
        return
    stop = min(spec.start + spec.size, spec.full_shape[spec.dim])
    index = [slice(None)] * len(spec.full_shape)
    index[spec.dim] = slice(spec.start, stop)
    param.narrow(spec.dim, 0, stop - spec.start).copy_(src[tuple(index)])
    if stop - spec.start < spec.size:
        param.narrow(spec.dim, stop - spec.start, spec.size - (stop - spec.start)).zero_()


def even_split(total: int, group: TensorParallelGroup | None, what: str) -> tuple[int, int]:
    """(start, size) of this rank's equal share of `total`."""
    tp = size_of(group)
    if total % tp:
        raise ValueError(f"{what}: {total} does not split over {tp} ranks")
    size = total // tp
    return rank_of(group) * size, size


class ColumnParallelLinear(nn.Linear):
    """y[:, start:start + size] of ``x @ W.T``: output features ``rows = (start, size)`` of this rank."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rows: tuple[int, int] | None = None,
        group: TensorParallelGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        start, size = rows if rows is not None else even_split(out_features, group, "output features")
        super().__init__(in_features, size, bias=bias, device=device, dtype=dtype)
        self.shard_specs = {"weight": ShardSpec((out_features, in_features), 0, start, size)}
        if bias:
            self.shard_specs["bias"] = ShardSpec((out_features,), 0, start, size)


class RowParallelLinear(nn.Linear):
    """``x @ W.T`` where this rank holds input features ``cols = (start, size)`` and x is its matching
    part; the partial products are all-reduced, so every rank gets the full output."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        cols: tuple[int, int] | None = None,
        group: TensorParallelGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        start, size = cols if cols is not None else even_split(in_features, group, "input features")
        super().__init__(size, out_features, bias=bias, device=device, dtype=dtype)
        self.group = group
        self.shard_specs = {"weight": ShardSpec((out_features, in_features), 1, start, size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None or self.group.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias if self.group.rank == 0 else None)
        return self.group.all_reduce(y)


def vocab_rows(vocab_size: int, group: TensorParallelGroup | None) -> tuple[int, int]:
    """(start, rows) of this rank's vocabulary part: ``ceil(V / tp)`` rows each (the last one padded)."""
    rows = -(-vocab_size // size_of(group))
    return rank_of(group) * rows, rows


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        dim: int,
        group: TensorParallelGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        self.start, rows = vocab_rows(vocab_size, group)
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device, dtype=dtype))
        self.shard_specs = {"weight": ShardSpec((vocab_size, dim), 0, self.start, rows)}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group is None or self.group.size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local * mine, self.weight) * mine[..., None].to(self.weight.dtype)
        return self.group.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered: every rank returns the full ``[..., V]``."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        group: TensorParallelGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        start, rows = vocab_rows(vocab_size, group)
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device, dtype=dtype))
        self.shard_specs = {"weight": ShardSpec((vocab_size, dim), 0, start, rows)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if self.group is None or self.group.size == 1:
            return logits
        return self.group.all_gather(logits, dim=-1)[..., : self.vocab_size]
