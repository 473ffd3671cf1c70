"""Plain-torch reference of `kernels/window_scores.py`: how much the observation window's queries attend to
each key, the score latent KV compression and SnapKV keep keys by (`policies/kv_compression.py`).

Shapes: ``q_obs [H, G, W, d]`` holds the ``G`` query heads of each of ``H`` KV heads for the window's ``W``
queries; window query ``i`` sits on position ``lengths[h] - W + i`` (a negative position: no such query, the
row is ignored). ``keys [H, S, d]``: key ``j`` of head ``h`` sits on position ``starts[h] + j`` and is valid
for ``j < counts[h]`` (one rank's span of a sequence-parallel sequence; by default ``starts = 0`` and
``counts = lengths``, the whole sequence). A query sees the valid keys at or before its position.

- `window_lse_ref`: float32 ``[H, G, W]``, each query's log-sum-exp of its scaled logits over the keys it
  sees here (``-inf`` where it sees none).
- `window_probs_ref`: float32 ``[H, G, S]``, ``exp(logit - lse)`` summed over the valid window queries and
  divided by their number, given each query's ``lse`` (its own `window_lse_ref`, or the log-sum-exp over
  every rank's keys); 0 at keys no query sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["check_window_args", "window_lse_ref", "window_probs_ref", "window_scores_ref"]


def check_window_args(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the shapes; (lengths, starts, counts) as int64 on the keys' device."""
    if q_obs.dim() != 4 or keys.dim() != 3:
        raise ValueError(
            f"q_obs must be [H, G, W, d] and keys [H, S, d], got {tuple(q_obs.shape)}, {tuple(keys.shape)}"
        )
    h, _, _, d = q_obs.shape
    if keys.shape[0] != h or keys.shape[2] != d:
        raise ValueError(f"keys {tuple(keys.shape)} do not match q_obs {tuple(q_obs.shape)}")
    dev = keys.device

    def per_head(x: torch.Tensor | None, name: str, default: torch.Tensor) -> torch.Tensor:
        if x is None:
            return default
        if x.shape != (h,):
            raise ValueError(f"{name} must be [H] = [{h}], got {tuple(x.shape)}")
        return x.to(device=dev, dtype=torch.long)

    lens = per_head(lengths, "lengths", torch.zeros(0))
    return lens, per_head(starts, "starts", torch.zeros_like(lens)), per_head(counts, "counts", lens)


def _logits(q_obs: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    h, g, w, d = q_obs.shape
    q = q_obs.float().reshape(h, g * w, d)
    return torch.bmm(q, keys.float().transpose(1, 2)).mul_(scale).view(h, g, w, keys.shape[1])


def _visible(
    lengths: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, w: int, s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([H, W, S] which keys each query sees, [H, W] which queries exist)."""
    local = torch.arange(s, device=lengths.device)[None, :]
    q_pos = lengths[:, None] - w + torch.arange(w, device=lengths.device)  # [H, W]
    key_pos = starts[:, None] + local  # [H, S]
    seen = (local < counts[:, None])[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])
    return seen, q_pos >= 0


def _chunks(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float | None,
    max_elements: int,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Heads in chunks whose ``G x W x S`` float32 logits fit in `max_elements` (one head at least): each
    chunk's (heads, logits ``[h, G, W, S]``, which keys each query sees ``[h, W, S]``, which queries exist
    ``[h, W]``); `rows` are `check_window_args`' lengths, starts and counts."""
    lengths, starts, counts = rows
    h, g, w, d = q_obs.shape
    s = keys.shape[1]
    scale = d**-0.5 if scale is None else scale
    step = max(1, max_elements // max(g * w * s, 1))
    for h0 in range(0, h, step):
        hs = slice(h0, min(h, h0 + step))
        seen, valid_q = _visible(lengths[hs], starts[hs], counts[hs], w, s)
        yield hs, _logits(q_obs[hs], keys[hs], scale), seen, valid_q


def window_lse_ref(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    *,
    starts: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    scale: float | None = None,
    max_elements: int = 1 << 26,
) -> torch.Tensor:
    """float32 ``[H, G, W]`` (module docstring); ``max_elements``: logits computed at once (heads chunked)."""
    rows = check_window_args(q_obs, keys, lengths, starts, counts)
    out = torch.empty(q_obs.shape[:3], dtype=torch.float32, device=keys.device)
    for hs, logits, seen, _ in _chunks(q_obs, keys, rows, scale, max_elements):
        out[hs] = logits.masked_fill_(~seen[:, None], float("-inf")).logsumexp(dim=-1)
    return out


def window_probs_ref(
    q_obs: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    lse: torch.Tensor,
    *,
    starts: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    scale: float | None = None,
    max_elements: int = 1 << 26,
) -> torch.Tensor:
    """float32 ``[H, G, S]`` (module docstring); ``lse`` float32 ``[H, G, W]``."""
    rows = check_window_args(q_obs, keys, lengths, starts, counts)
    h, g, w, _ = q_obs.shape
    if lse.shape != (h, g, w):
        raise ValueError(f"lse must be [H, G, W] = {[h, g, w]}, got {tuple(lse.shape)}")
    out = torch.empty(h, g, keys.shape[1], dtype=torch.float32, device=keys.device)
    zero = torch.zeros((), device=keys.device)
    for hs, logits, seen, valid_q in _chunks(q_obs, keys, rows, scale, max_elements):
        part = lse[hs].float()
        use = seen[:, None] & valid_q[:, None, :, None] & torch.isfinite(part)[..., None]  # [h, G, W, S]
        probs = torch.where(use, torch.exp(logits - torch.where(use, part[..., None], zero)), zero)
        out[hs] = probs.sum(dim=2) / valid_q.sum(dim=1).clamp(min=1)[:, None, None]
    return out


def window_scores_ref(
    q_obs: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """float32 ``[H, G, S]``: the window queries' softmax over all of a head's keys, averaged over queries."""
    return window_probs_ref(
        q_obs, keys, lengths, window_lse_ref(q_obs, keys, lengths, scale=scale), scale=scale
    )
