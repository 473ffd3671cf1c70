"""How attention heads split across tensor-parallel ranks.

Each of `tp` ranks holds ``Hq / tp`` consecutive query heads. With ``tp <= Hkv`` it also holds
``Hkv / tp`` consecutive KV heads (those its query heads use: GQA groups are consecutive); with
``tp > Hkv`` KV heads are replicated: each rank keeps the one KV head its query heads use
(``tp / Hkv`` ranks share it). Sizes that split unevenly are refused (no padded or uneven heads), so a
size works when it divides Hq and either divides Hkv or is a multiple of it: for SmolLM2 (9 query / 3 KV
heads) that is 1, 3 and 9.
"""

from __future__ import annotations

from dataclasses import dataclass

from entropyinfer.errors import ConfigError


@dataclass(frozen=True)
class HeadShard:
    """The heads of one rank: query heads ``[q_start, q_start + q_count)``, KV heads
    ``[kv_start, kv_start + kv_count)`` (global head indices)."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int
    kv_replicas: int  # ranks holding each of these KV heads (1: no replication)


def works(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    return num_heads % tp == 0 and (num_kv_heads % tp == 0 or tp % num_kv_heads == 0)


def tensor_parallel_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """The tensor-parallel sizes that split these heads evenly."""
    return [t for t in range(1, num_heads + 1) if works(num_heads, num_kv_heads, t)]


def check_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """ConfigError naming the sizes that work unless `tp` splits the heads evenly."""
    if tp < 1 or not works(num_heads, num_kv_heads, tp):
        sizes = ", ".join(map(str, tensor_parallel_sizes(num_heads, num_kv_heads)))
        raise ConfigError(
            f"tensor_parallel_size={tp} does not split {num_heads} query / {num_kv_heads} KV heads evenly "
            f"(it must divide the query heads and divide or be a multiple of the KV heads); "
            f"sizes that work: {sizes}"
        )


def head_shard(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadShard:
    check_heads(num_heads, num_kv_heads, tp)
    q_count = num_heads // tp
    if tp <= num_kv_heads:
        kv_count = num_kv_heads // tp
        return HeadShard(rank * q_count, q_count, rank * kv_count, kv_count, 1)
    replicas = tp // num_kv_heads
    return HeadShard(rank * q_count, q_count, rank // replicas, 1, replicas)
