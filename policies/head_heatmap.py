"""Heat maps of per-(layer, KV head) statistics as PNG bytes, with no plotting library (numpy + zlib).

Three panels side by side, each a grid of layers (rows, layer 0 at the top) by KV heads (columns):
rigidity (how often the head was rigid; for one request: rigid or not), entropy (the mean normalised block
entropy, ``H / ln V``) and budget (the table's factor for a profile; the mean budget in tokens over the
row's largest for one request). Each panel is scaled to its own range, dark blue (low) to yellow (high);
NaN cells (layers that ran dense) are grey. A 1-pixel white frame separates the cells.

    png = profile_heatmap(actor_snapshot)           # GET /v1/policy/heads.png, `entropyinfer policy plot`
    png = request_heatmap(stats)                    # one request's `HeadStats` (Python API)
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from entropyinfer.policies.head_stats import HeadStats

__all__ = ["PANELS", "encode_png", "heatmap_png", "profile_heatmap", "request_heatmap"]

PANELS = ("rigidity", "entropy", "budget")
# a few stops of a blue -> teal -> yellow ramp (viridis-like), interpolated linearly
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)
_GREY = np.array([200, 200, 200], dtype=np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` image (8-bit RGB, no filter)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _colour(values: np.ndarray) -> np.ndarray:
    """uint8 ``[L, H, 3]`` of float ``[L, H]`` scaled to the finite values' range; NaN grey."""
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    out = np.empty((*v.shape, 3), dtype=np.uint8)
    out[:] = _GREY
    if finite.any():
        lo, hi = float(v[finite].min()), float(v[finite].max())
        t = (v[finite] - lo) / (hi - lo) if hi > lo else np.full(int(finite.sum()), 0.5)
        pos = t * (len(_STOPS) - 1)
        i = np.minimum(pos.astype(int), len(_STOPS) - 2)
        f = (pos - i)[:, None]
        out[finite] = np.round(_STOPS[i] * (1 - f) + _STOPS[i + 1] * f).astype(np.uint8)
    return out


def heatmap_png(panels: list[np.ndarray], cell: int = 12, gap: int = 8) -> bytes:
    """PNG of float ``[L, H]`` panels side by side (`cell` pixels per cell, `gap` between panels)."""
    if not panels:
        raise ValueError("nothing to draw")
    rows = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] * cell for p in panels) + gap * (len(panels) + 1)
    img = np.full((rows * cell + 2 * gap, width, 3), 255, dtype=np.uint8)
    x = gap
    for p in panels:
        colours = _colour(p)
        block = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
        block[::cell, :] = 255  # cell frames
        block[:, ::cell] = 255
        img[gap : gap + block.shape[0], x : x + block.shape[1]] = block
        x += p.shape[1] * cell + gap
    return encode_png(img)


def _grid(rows: Any) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in r] for r in rows], dtype=float)


def profile_heatmap(snapshot: dict[str, Any], out: str | Path | None = None) -> bytes:
    """The heat map of a policy actor's `snapshot` (rigid frequency, entropy mean, table factors); also
    written to `out` if given."""
    stats = snapshot["statistics"]
    panels = [
        _grid(stats["rigid_frequency"]),
        _grid(stats["entropy_mean"]),
        _grid(snapshot["table"]["scales"]),
    ]
    png = heatmap_png(panels)
    if out is not None:
        Path(out).write_bytes(png)
    return png


def request_heatmap(stats: HeadStats, out: str | Path | None = None) -> bytes:
    """The heat map of one request's head statistics (rigid, mean normalised entropy, mean budget in tokens
    over each layer's largest); also written to `out` if given."""
    per = stats.per_head()
    rigid = np.where(stats.profiled[:, None], stats.rigid.astype(float), np.nan)
    budget = per["budget"]
    with np.errstate(invalid="ignore", divide="ignore"):
        top = np.nanmax(np.where(np.isfinite(budget), budget, -np.inf), axis=1, keepdims=True)
        budget = np.where(top > 0, budget / top, np.nan)
    png = heatmap_png([rigid, per["entropy"], budget])
    if out is not None:
        Path(out).write_bytes(png)
    return png
