"""Tests of exact dense chunk attention (`shard/dense_attention.py`): a chunk's prefix call with each GQA
group's query heads stacked on the query axis, merged with its own causal part by log-sum-exp, equals plain
causal attention for ragged lengths, group sizes, half precision and strided K/V."""

from __future__ import annotations

import pytest
import torch

from entropyinfer.shard.dense_attention import dense_causal_attention, dense_chunk_attention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """float64 softmax attention of ``q`` at ``[q_offset, q_offset + Nq)`` over keys ``[0, p]``."""
    g = q.shape[0] // k.shape[0]
    kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    scores = q.double() @ kk.transpose(1, 2) * q.shape[-1] ** -0.5
    pos = torch.arange(q.shape[1], device=q.device)[:, None] + q_offset
    keys = torch.arange(k.shape[1], device=q.device)[None, :]
    return torch.softmax(scores.masked_fill(keys > pos, float("-inf")), dim=-1) @ vv


@pytest.mark.parametrize(
    ("hq", "hkv", "n", "q_offset"),
    [
        (4, 2, 300, 256),
        (6, 2, 530, 512),  # G = 3, a ragged last chunk
        (8, 1, 1100, 1024),  # one KV head for 8 query heads
        (3, 3, 640, 128),  # no GQA, a long chunk
        (4, 2, 257, 256),  # a one-token chunk
    ],
)
def test_chunk_equals_causal_attention(hq: int, hkv: int, n: int, q_offset: int) -> None:
    gen = torch.Generator().manual_seed(hq * 1000 + n)
    q, k, v = (torch.randn(h, n, 16, generator=gen) * 2 for h in (hq, hkv, hkv))
    got = dense_chunk_attention(q[:, q_offset:], k, v, q_offset)
    torch.testing.assert_close(got.double(), reference(q[:, q_offset:], k, v, q_offset), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, dense_causal_attention(q, k, v)[:, q_offset:], atol=1e-5, rtol=1e-5)


def test_half_precision_and_strided_inputs() -> None:
    """float16 (a dtype the GPU's flash kernel takes), K/V as strided views of a wider pool, q transposed."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(700, 4, 32, generator=gen).transpose(0, 1)
    pool = torch.randn(2, 900, 32, generator=gen)
    k, v = pool[:, :700], pool.flip(1)[:, :700]
    got = dense_chunk_attention(q[:, 512:].half(), k.half(), v.half(), 512)
    assert got.dtype == torch.float16 and got.shape == (4, 188, 32)
    torch.testing.assert_close(got.double(), reference(q[:, 512:], k, v, 512), atol=3e-3, rtol=3e-3)


def test_keys_must_cover_the_chunk() -> None:
    q, k = torch.randn(2, 10, 8), torch.randn(1, 20, 8)
    with pytest.raises(ValueError, match="keys must cover"):
        dense_chunk_attention(q, k, k, 15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nq", [256, 77, 2048])
def test_chunk_over_a_long_prefix_on_gpu(nq: int) -> None:
    """bf16 on the GPU (the flash kernel), a chunk over a 20k prefix, against float64 attention."""
    gen = torch.Generator(device="cuda").manual_seed(nq)
    n = 20000 + nq
    q, k, v = (torch.randn(h, n, 128, device="cuda", generator=gen) for h in (32, 8, 8))
    q0 = n - nq
    got = dense_chunk_attention(q[:, q0:].bfloat16(), k.bfloat16(), v.bfloat16(), q0)
    torch.testing.assert_close(got.double(), reference(q[:, q0:], k, v, q0), atol=2e-2, rtol=2e-2)
