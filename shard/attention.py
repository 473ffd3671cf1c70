"""Attention execution on one shard: dense causal prefill and decode over the KV cache.

On a GPU the Triton kernels run; on the CPU their plain-torch references do (ARCHITECTURE.md), whatever
TRITON_INTERPRET says: the interpreter is for testing kernels, not for serving. Each kernel op decides
that itself (`kernels/backend.py`); this module passes no backend.

Sparse prefill (entropy / fixed policies) plugs in through `PrefillAttention`: the policy decides the
blocks (`policies/`), a kernel (`kernels/`) computes; this module only dispatches.

Which policy prefills how is the registry's table (`policies/registry.py`): `build_prefill_attention` turns
a policy's `prefill` kind ("dense" / "sparse") and `selection` rule into the attention object below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from entropyinfer.kernels.block_selection_ref import rigid_heads
from entropyinfer.kernels.decode_attention import decode_attention
from entropyinfer.kernels.sparse_prefill import sparse_prefill_attention
from entropyinfer.kernels.tiling import row_chunk
from entropyinfer.policies.budgets import fixed_budget_for_density
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.entropy import plan_density_tensor, plan_layer
from entropyinfer.policies.registry import SELECTIONS, Selection, get_policy


class PrefillAttention(Protocol):
    """Attention over a whole prompt for one layer: q [Hq, N, d], k and v [Hkv, N, d] -> [Hq, N, d].

    An implementation may also have ``begin(num_layers, seq_len)``: `Engine.prefill` calls it once before
    layer 0 (SparsePrefill solves the `fixed` policy's budget for a target density there)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def stats(self) -> dict: ...


def _sdpa_backends_cuda() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact causal attention without an N x N score matrix (fused SDPA; cuDNN first on GPU)."""
    group = q.shape[0] // k.shape[0]
    if group > 1:  # the fused kernels want one KV head per query head
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    from torch.nn.attention import sdpa_kernel

    try:
        ctx = sdpa_kernel(_sdpa_backends_cuda(), set_priority=True)
    except TypeError:  # older torch: no priority order
        ctx = sdpa_kernel(_sdpa_backends_cuda())
    with ctx:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


class DensePrefill:
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dense_causal_attention(q, k, v)

    def stats(self) -> dict:
        return {"density": 1.0, "rigid_fraction": 0.0}


def cached_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, d] over k_cache/v_cache [B, Hkv, capacity, d] with lengths [B, Hkv] -> [B, Hq, d]."""
    return decode_attention(q, k_cache, v_cache, lengths)


class SparsePrefill:
    """EntropyInfer (`entropy`) or CritiPrefill (`fixed`) prefill: per layer, profile the blocks, pick
    per-(KV head, segment) block lists (`policies/entropy.py`), run the block-sparse kernel on them.
    Layer 0 and prompts too short to have a sparse segment run dense.

    Nothing here waits for the GPU: per-layer statistics stay device tensors until `stats()`, so the host
    keeps queueing the next layers' kernels while this one runs."""

    def __init__(self, policy: Selection, config: SparsePrefillConfig):
        self.policy, self.config = policy, config
        # what the layers run with: `config`, or for `fixed` with a target_density the solved budget
        self.layer_config: SparsePrefillConfig | None = None if self._solves_budget else config
        self.layer_density: list[float | torch.Tensor] = []
        self.layer_rigid: list[torch.Tensor | None] = []  # per layer: fraction of rigid KV heads, or None
        self.sparse_counts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (counts, dense_segments)
        self.layer_entropy: list[torch.Tensor | None] = []  # per layer: mean entropy per KV head, or None
        # spread mode: per layer, the fraction of KV heads rigid by the reference's test (whole prompt,
        # unscaled entropy < entropy_threshold), to compare with the spread rule's rigid-so-far heads
        self.layer_rigid_reference: list[torch.Tensor] = []

    @property
    def _solves_budget(self) -> bool:
        return self.policy == "fixed" and self.config.target_density is not None

    def begin(self, num_layers: int, seq_len: int) -> None:
        """Called by `Engine.prefill` before layer 0. For `fixed` with a `target_density`: the fixed budget
        whose mean density over the `num_layers` layers of this `seq_len`-token prompt is closest to the
        target (`policies.budgets.fixed_budget_for_density`; host arithmetic, no device sync)."""
        if not self._solves_budget:
            return
        cfg = self.config
        budget = fixed_budget_for_density(
            float(cfg.target_density or 0.0),
            seq_len=seq_len,
            segment_size=cfg.segment_size,
            block_size=cfg.block_size,
            threshold_len=cfg.threshold_len,
            num_layers=num_layers,
        )
        self.layer_config = dataclasses.replace(cfg, fixed_budget=budget, target_density=None)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cfg, n = self.layer_config, q.shape[1]
        if cfg is None:
            raise RuntimeError(
                "fixed policy with target_density: call begin(num_layers, seq_len) before the first layer "
                "(Engine.prefill does)"
            )
        # Segment s is sparse only if it starts at or after threshold_len and is not the last one.
        if layer == 0 or n <= max(cfg.threshold_len, cfg.segment_size) + cfg.segment_size:
            self.layer_density.append(1.0)
            self.layer_rigid.append(None)
            self.layer_entropy.append(None)
            return dense_causal_attention(q, k, v)
        plan = plan_layer(
            q,
            k,
            cfg,
            policy=self.policy,
        )
        s_len, b = cfg.segment_size, cfg.block_size
        out = sparse_prefill_attention(
            q, k, v, plan.block_idx, plan.kernel_counts, segment_size=s_len, block_size=b
        )
        self.layer_density.append(plan_density_tensor(plan.counts, plan.dense_segments, n, s_len, b))
        self.layer_rigid.append(plan.rigid.float().mean())
        self.sparse_counts.append((plan.counts, plan.dense_segments))
        self.layer_entropy.append(plan.entropy[:, 1:].float().mean(dim=1))
        if plan.spread is not None:
            self.layer_rigid_reference.append(rigid_heads(plan.entropy, cfg.entropy_threshold).float().mean())
        return out

    def head_entropy(self, num_kv_heads: int) -> torch.Tensor | None:
        """float32 ``[layers, Hkv]`` (CPU): each KV head's mean block entropy over segments >= 1, NaN for
        layers that ran dense; None if no layer was profiled. Feeds per-head KV compression capacities."""
        if all(e is None for e in self.layer_entropy):
            return None
        nan = torch.full((num_kv_heads,), float("nan"))
        return torch.stack([nan if e is None else e.detach().float().cpu() for e in self.layer_entropy])

    def stats(self) -> dict[str, Any]:
        rigid = [None if r is None else float(r) for r in self.layer_rigid]
        profiled = [r for r in rigid if r is not None]
        out: dict[str, Any] = {
            "density": sum(float(d) for d in self.layer_density) / max(len(self.layer_density), 1),
            "rigid_fraction": sum(profiled) / len(profiled) if profiled else 0.0,
            "rigid_fraction_per_layer": rigid,
        }
        if self.layer_rigid_reference:
            ref = [float(r) for r in self.layer_rigid_reference]
            out["rigid_fraction_reference"] = sum(ref) / len(ref)
        if self._solves_budget and self.layer_config is not None:
            out["fixed_budget"] = self.layer_config.fixed_budget  # solved for target_density
        cfg = self.layer_config or self.config
        tokens = [
            (counts[:, ~dense] * cfg.block_size).flatten().float().cpu()
            for counts, dense in self.sparse_counts
        ]
        budget = torch.cat(tokens) if tokens else None
        if budget is not None and budget.numel():
            out["budget_tokens"] = {
                "mean": float(budget.mean()),
                "min": int(budget.min()),
                "max": int(budget.max()),
                "base": cfg.base_budget if self.policy == "entropy" else cfg.fixed_budget,
            }
        return out


def warm_up_lengths(config: SparsePrefillConfig, max_len: int) -> list[int]:
    """Prompt lengths (<= max_len) whose sparse prefill compiles every kernel variant a request can need.

    The profiling kernels are compiled per `row_chunk` of the key-block count (and whether a row fits one
    chunk): the shortest prompt of each such class, and each also one token shorter, since Triton compiles
    integer arguments divisible by 16 apart."""
    s_len, bps = config.segment_size, config.segment_size // config.block_size
    shortest = max(config.threshold_len, s_len) + s_len + 1
    seen: set[tuple[int, bool]] = set()
    lengths = []
    for nseg in range(-(-shortest // s_len), max_len // s_len + 1):
        nblk = (nseg - 1) * bps
        variant = (row_chunk(nblk), nblk <= row_chunk(nblk))
        if variant not in seen:
            seen.add(variant)
            lengths += [n for n in (nseg * s_len, nseg * s_len - 1) if n >= shortest]
    return lengths


@torch.inference_mode()
def warm_up_sparse_prefill(
    config: SparsePrefillConfig,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Run both sparse policies once at every `warm_up_lengths` length on random data (GPU only), so that
    requests never wait for a kernel compile; a no-op on the CPU (the torch references need none)."""
    if device.type != "cuda":
        return
    gen = torch.Generator(device=device).manual_seed(0)
    for n in warm_up_lengths(config, max_len):
        q = torch.randn(num_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(num_kv_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        for policy in SELECTIONS:
            SparsePrefill(policy, config)(1, q, k, k)
    torch.cuda.synchronize(device)


def build_prefill_attention(policy: str, config: SparsePrefillConfig) -> PrefillAttention:
    """The prefill attention of a registered policy (`UnknownPolicyError` for an unknown name)."""
    entry = get_policy(policy)
    if entry.prefill == "sparse" and entry.selection is not None:
        return SparsePrefill(entry.selection, config)
    return DensePrefill()
