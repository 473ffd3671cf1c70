"""Plain-torch reference for decode attention over per-KV-head caches (see `decode_attention.py`).

Layout (the same as the Triton kernel's):

- ``q``: ``[B, Hq, d]``, one new token per sequence.
- ``k_cache`` / ``v_cache``: ``[B, Hkv, L_max, d]``, possibly strided views of a larger buffer.
- ``lengths``: integer ``[B, Hkv]``, the number of valid keys of each (sequence, KV head); keys
  ``0 .. lengths[b, h] - 1`` are attended, the rest of the ``L_max`` slots are ignored. Compressed caches keep
  a different count per head, a dense cache has equal lengths.
- GQA: ``Hq = G * Hkv``; query head ``h`` reads KV head ``h // G``. No K/V repeat: the ``G`` query heads of a
  group are viewed as a ``[G, d]`` block against their KV head's ``[L_max, d]`` keys.

Algorithm: scores ``q k^T * scale`` in float32, masked to ``-inf`` past each head's length, softmax, times
``v`` in float32, cast to ``q``'s dtype. A head with length 0 gives a zero output (not NaN).
It materialises ``[B, Hq, L_max]`` scores: meant for tests and the CPU path, not for speed.
"""

from __future__ import annotations

import torch


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``lengths[b, h]`` keys of each KV head.

    Returns ``[B, Hq, d]`` in ``q``'s dtype; computed in float32.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected q [B, Hq, d] and k_cache/v_cache [B, Hkv, L_max, d] of one shape; "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    batch, hq, d = q.shape
    kb, hkv, l_max, kd = k_cache.shape
    if kb != batch or kd != d or hq % hkv != 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}: need the same B and d, "
            "and Hq a multiple of Hkv"
        )
    if tuple(lengths.shape) != (batch, hkv):
        raise ValueError(f"lengths must be [B, Hkv] = [{batch}, {hkv}], got {tuple(lengths.shape)}")
    g = hq // hkv
    if scale is None:
        scale = d**-0.5

    qf = q.float().view(batch, hkv, g, d)
    kf = k_cache.float()
    vf = v_cache.float()
    scores = torch.einsum("bhgd,bhld->bhgl", qf, kf) * scale  # [B, Hkv, G, L_max]
    pos = torch.arange(l_max, device=q.device)
    valid = pos.view(1, 1, l_max) < lengths.to(device=q.device, dtype=torch.long).unsqueeze(-1)  # [B, Hkv, L]
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A head with no valid key has an all -inf row, whose softmax is NaN: such heads attend to nothing.
    probs = torch.where(valid.unsqueeze(2), probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    out = torch.einsum("bhgl,bhld->bhgd", probs, vf)
    return out.reshape(batch, hq, d).to(q.dtype)
