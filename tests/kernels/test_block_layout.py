"""The shared segment / block layout (`kernels/block_layout.py`): geometry and the input checks."""

from __future__ import annotations

import pytest
import torch

from entropyinfer.kernels.block_layout import (
    check_qk,
    check_sparse_prefill_args,
    last_count_cap,
    num_blocks,
    num_segments,
    visible_blocks,
)
from entropyinfer.kernels.block_selection_ref import count_caps


@pytest.mark.parametrize(
    ("n", "seg", "b"), [(1, 64, 8), (64, 64, 8), (65, 64, 8), (1000, 64, 8), (4100, 256, 16)]
)
def test_geometry(n: int, seg: int, b: int) -> None:
    nseg = num_segments(n, seg)
    assert (nseg - 1) * seg < n <= nseg * seg
    assert num_blocks(n, seg, b) == (nseg - 1) * seg // b  # the last segment's keys are in no block
    vis = visible_blocks(nseg, seg, b, "cpu")
    assert vis.tolist() == [s * seg // b for s in range(nseg)]
    caps = count_caps(n, seg, b, "cpu")
    assert caps.tolist() == [max(0, min(int(v), last_count_cap(n, seg, b))) for v in vis]


def test_check_qk() -> None:
    q, k = torch.zeros(4, 10, 8), torch.zeros(2, 10, 8)
    check_qk(q, k, 32, 8)
    with pytest.raises(ValueError, match="3-D"):
        check_qk(q[0], k, 32, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        check_qk(q[:3], k, 32, 8)
    with pytest.raises(ValueError, match="like q"):
        check_qk(q, k[:, :9], 32, 8)
    with pytest.raises(ValueError, match="empty"):
        check_qk(q[:, :0], k[:, :0], 32, 8)
    with pytest.raises(ValueError, match="positive multiple of block_size"):
        check_qk(q, k, 30, 8)


def test_check_sparse_prefill_args() -> None:
    q, kv = torch.zeros(4, 40, 16), torch.zeros(2, 40, 16)
    idx, cnt = torch.zeros(2, 3, 1, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32)
    check_sparse_prefill_args(q, kv, kv, idx, cnt, 16, 4, 0)
    check_sparse_prefill_args(q[:, 30:], kv, kv, idx, cnt, 16, 4, 30)  # a chunk: segments from position 0
    with pytest.raises(ValueError, match="keys must cover"):
        check_sparse_prefill_args(q, kv, kv, idx, cnt, 16, 4, 1)
    with pytest.raises(ValueError, match="int32"):
        check_sparse_prefill_args(q, kv, kv, idx.long(), cnt, 16, 4, 0)
    with pytest.raises(ValueError, match="block_cnt must be"):
        check_sparse_prefill_args(q, kv, kv, idx, cnt[:, :2], 16, 4, 0)
    with pytest.raises(ValueError, match="dtypes differ"):
        check_sparse_prefill_args(q.half(), kv, kv, idx, cnt, 16, 4, 0)
