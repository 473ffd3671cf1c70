"""Plain-torch reference of `kernels/paged_window_scores.py`: `window_scores_ref` of several layers of one
sequence, each layer's keys gathered through the sequence's page table first."""

from __future__ import annotations

import torch

from entropyinfer.kernels.window_scores_ref import window_scores_ref

__all__ = ["check_paged_window_args", "paged_window_scores_ref"]


def check_paged_window_args(
    q_obs: torch.Tensor, k_pages: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor
) -> None:
    """Validate `paged_window_scores`'s shapes (``q_obs [L, H, G, W, d]``, ``k_pages [L, pages, H,
    page_size, d]``, ``table [H, P]``, ``lengths [L, H]`` at most ``P * page_size``)."""
    if q_obs.dim() != 5 or k_pages.dim() != 5 or table.dim() != 2:
        raise ValueError(
            f"q_obs must be [L, H, G, W, d], k_pages [L, pages, H, page_size, d] and table [H, P], got "
            f"{tuple(q_obs.shape)}, {tuple(k_pages.shape)}, {tuple(table.shape)}"
        )
    nl, h, _, _, d = q_obs.shape
    if k_pages.shape[0] != nl or k_pages.shape[2] != h or k_pages.shape[4] != d or table.shape[0] != h:
        raise ValueError(
            f"k_pages {tuple(k_pages.shape)} and table {tuple(table.shape)} do not match q_obs "
            f"{tuple(q_obs.shape)}"
        )
    if lengths.shape != (nl, h):
        raise ValueError(f"lengths must be [L, H] = [{nl}, {h}], got {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.max()) > table.shape[1] * k_pages.shape[3]:
        raise ValueError(f"a length exceeds the table's {table.shape[1]} pages of {k_pages.shape[3]} tokens")


def paged_window_scores_ref(
    q_obs: torch.Tensor,
    k_pages: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """float32 ``[L, H, G, P * page_size]``: each layer's keys gathered through the table, then
    `window_scores_ref` (see `kernels/window_scores.py` `paged_window_scores`)."""
    check_paged_window_args(q_obs, k_pages, table, lengths)
    nl, h, _, _, d = q_obs.shape
    heads = torch.arange(h, device=k_pages.device)[:, None]
    idx = table.to(device=k_pages.device, dtype=torch.long)
    out = []
    for li in range(nl):
        keys = k_pages[li][idx, heads].reshape(h, -1, d)  # [H, P, page_size, d] -> [H, S, d]
        out.append(window_scores_ref(q_obs[li], keys, lengths[li], scale=scale))
    return torch.stack(out)
