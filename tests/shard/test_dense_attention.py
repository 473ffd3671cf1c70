"""Tests of exact dense chunk attention (`shard/dense_attention.py`): a chunk's prefix call with the GQA group
folded onto the query axis and the keys split into ranges (split-KV, as the GPU runs a short chunk over a
long prefix) equals plain causal attention, for any number of ranges, ragged lengths and group sizes."""

from __future__ import annotations

import pytest
import torch

from entropyinfer.shard.dense_attention import _prefix_parts, dense_causal_attention, dense_chunk_attention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """float64 softmax attention of ``q`` at ``[q_offset, q_offset + Nq)`` over keys ``[0, p]``."""
    g = q.shape[0] // k.shape[0]
    kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    scores = q.double() @ kk.transpose(1, 2) * q.shape[-1] ** -0.5
    pos = torch.arange(q.shape[1])[:, None] + q_offset
    scores = scores.masked_fill(torch.arange(k.shape[1])[None, :] > pos, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv


@pytest.mark.parametrize(
    ("hq", "hkv", "n", "q_offset", "parts"),
    [
        (4, 2, 300, 256, 1),
        (4, 2, 300, 256, 3),  # 256 keys in 3 ranges of 85 and one left over
        (6, 2, 530, 512, 7),  # G = 3, a ragged last chunk
        (8, 1, 1100, 1024, 16),
        (3, 3, 640, 128, 5),  # no GQA, a long chunk
        (4, 2, 260, 256, 500),  # more ranges than keys: one key each
    ],
)
def test_split_prefix_equals_causal_attention(hq: int, hkv: int, n: int, q_offset: int, parts: int) -> None:
    gen = torch.Generator().manual_seed(hq * 1000 + n + parts)
    q, k, v = (torch.randn(h, n, 16, generator=gen) * 2 for h in (hq, hkv, hkv))
    ref = reference(q[:, q_offset:], k, v, q_offset)
    got = dense_chunk_attention(q[:, q_offset:], k, v, q_offset, parts=parts)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    whole = dense_causal_attention(q, k, v)[:, q_offset:]
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)


def test_split_prefix_in_half_precision_and_strided_inputs() -> None:
    """float16 (the dtype the GPU's flash kernel takes), K/V as strided views of a wider pool."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 700, 32, generator=gen)
    pool = torch.randn(2, 900, 32, generator=gen)
    k, v = pool[:, :700], pool.flip(1)[:, :700]
    ref = reference(q[:, 512:], k, v, 512)
    got = dense_chunk_attention(q[:, 512:].half(), k.half(), v.half(), 512, parts=4)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), ref, atol=3e-3, rtol=3e-3)


def test_parts_on_cpu_and_bad_bounds() -> None:
    assert _prefix_parts(8, 1024, 131072, torch.device("cpu")) == 1
    q, k = torch.randn(2, 10, 8), torch.randn(1, 20, 8)
    with pytest.raises(ValueError, match="keys must cover"):
        dense_chunk_attention(q, k, k, 15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nq", [256, 77, 2048])
def test_split_prefix_on_gpu(nq: int) -> None:
    """bf16 on the GPU, the number of key ranges chosen for the device (the last segment of a long prompt
    splits; a long chunk does not), against float64 attention."""
    gen = torch.Generator(device="cuda").manual_seed(nq)
    n = 20000 + nq
    q, k, v = (torch.randn(h, n, 128, device="cuda", generator=gen) for h in (32, 8, 8))
    q0 = n - nq
    ref = reference(q[:, q0:].cpu(), k.cpu(), v.cpu(), q0)
    got = dense_chunk_attention(q[:, q0:].bfloat16(), k.bfloat16(), v.bfloat16(), q0).cpu()
    torch.testing.assert_close(got.double(), ref, atol=2e-2, rtol=2e-2)
    rows = 4 * nq
    assert (_prefix_parts(8, rows, q0, q.device) > 1) == (nq <= 256)
