"""Observation-window scores of several layers of one sequence at once, its keys read through its page
table (no contiguous copy of the cache): the kernels of `kernels/window_scores.py` with a paged
`KeySource`, one program row per (layer, KV head). Semantics: `kernels/paged_window_scores_ref.py`."""

from __future__ import annotations

import torch

from entropyinfer.kernels.backend import Backend, runs_triton
from entropyinfer.kernels.paged_window_scores_ref import check_paged_window_args, paged_window_scores_ref
from entropyinfer.kernels.window_scores import TILES, KeySource, lse_pass, probs_pass, window_queries

__all__ = ["paged_window_scores"]


def paged_window_scores(
    q_obs: torch.Tensor,
    k_pages: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """float32 ``[L, H, G, P * page_size]``: `window_scores` of several layers of one sequence at once,
    its keys read through its page table (`paged_window_scores_ref`): ``q_obs [L, H, G, W, d]``, ``k_pages
    [L, pages, H, page_size, d]`` (each layer's key pool, last dim contiguous), ``table [H, P]`` (the head's
    pages, shared by the layers), ``lengths [L, H]`` (at most ``P * page_size``)."""
    check_paged_window_args(q_obs, k_pages, table, lengths)
    if not runs_triton(k_pages.device, backend):
        return paged_window_scores_ref(q_obs, k_pages, table, lengths, scale=scale)
    nl, h, g, w, d = q_obs.shape
    src = KeySource.paged(k_pages, table)
    lens = lengths.to(device=k_pages.device, dtype=torch.long).reshape(nl * h)
    rows = (lens, torch.zeros_like(lens), lens)
    q = window_queries(q_obs, k_pages.dtype).reshape(nl * h, g, w, d)
    scale = d**-0.5 if scale is None else scale
    lse = lse_pass(q, src, rows, scale, TILES.keys_per_split)
    return probs_pass(q, src, rows, lse, scale).unflatten(0, (nl, h))
