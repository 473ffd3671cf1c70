"""One decoder-only transformer for the Llama family (Llama 2/3/3.1, Qwen2/2.5, Qwen3, openPangu-Embedded).

The families differ only in flags of `ModelArch` (qkv/o bias, q/k norm, rope scaling, tied embeddings).
Parameter names follow Hugging Face, so a checkpoint loads by name. The model holds no cache and no
policy: `shard/engine.py` drives it layer by layer in prefill and step by step in decode.

Tensor parallelism: given a `TensorParallelGroup`, each rank builds only its part (`shard/parallel/`):
its query heads and their KV heads (q/k/v column-parallel, o row-parallel; `parallel/heads.py` says which
heads, replicating KV heads when the group is larger than their count), its share of the MLP columns
(gate/up column-parallel, down row-parallel), its vocabulary rows (embedding and lm_head). `model.arch` is
then the rank's view (`ModelArch.local`: its head counts), so the engine sizes its buffers per rank and
runs unchanged; row-parallel layers all-reduce and the lm_head all-gathers, so every rank's hidden states
and logits are the whole model's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from entropyinfer.kernels.layer_ops import add_rms_norm, silu_and_mul
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.layers import RMSNorm, Rotary, rope
from entropyinfer.shard.parallel.group import TensorParallelGroup, rank_of, size_of
from entropyinfer.shard.parallel.heads import head_shard
from entropyinfer.shard.parallel.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, group: TensorParallelGroup | None = None, **kw: Any) -> None:
        super().__init__()
        hq, hkv, d, h = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
        mine = head_shard(hq, hkv, size_of(group), rank_of(group))  # this rank's heads
        self.num_heads, self.num_kv_heads, self.head_dim = mine.q_count, mine.kv_count, d
        q_rows, kv_rows = (mine.q_start * d, mine.q_count * d), (mine.kv_start * d, mine.kv_count * d)
        self.q_proj = ColumnParallelLinear(h, hq * d, arch.qkv_bias, q_rows, group, **kw)
        self.k_proj = ColumnParallelLinear(h, hkv * d, arch.qkv_bias, kv_rows, group, **kw)
        self.v_proj = ColumnParallelLinear(h, hkv * d, arch.qkv_bias, kv_rows, group, **kw)
        self.o_proj = RowParallelLinear(hq * d, h, arch.o_bias, q_rows, group, **kw)
        self.q_norm = RMSNorm(d, arch.rms_norm_eps, **kw) if arch.qk_norm else None
        self.k_norm = RMSNorm(d, arch.rms_norm_eps, **kw) if arch.qk_norm else None
        self.qkv_proj: nn.Linear | None = None  # q|k|v in one matrix, made by `fuse` after loading

    def fuse(self) -> None:
        """Replace q/k/v_proj (Hugging Face's names, which checkpoints load into) by one projection: one
        GEMM instead of three, and two fewer kernels per decode step. Their memory is released."""
        if self.qkv_proj is None:
            self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def qkv(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_out: torch.Tensor | None = None,
        k_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, hidden] -> q [B, Hq, T, d], k and v [B, Hkv, T, d] (rope applied to q and k; v a view).
        q and k are written into `q_out` / `k_out` when given (e.g. the KV cache)."""
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = _fused(self.qkv_proj, "qkv_proj")(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, cos, sin, q_out), rope(k, cos, sin, k_out), v.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, group: TensorParallelGroup | None = None, **kw: Any) -> None:
        super().__init__()
        h, i, bias = arch.hidden_size, arch.intermediate_size, arch.mlp_bias
        self.gate_proj = ColumnParallelLinear(h, i, bias, None, group, **kw)
        self.up_proj = ColumnParallelLinear(h, i, bias, None, group, **kw)
        self.down_proj = RowParallelLinear(i, h, bias, None, group, **kw)
        self.gate_up_proj: nn.Linear | None = None  # gate|up in one matrix, made by `fuse` after loading

    def fuse(self) -> None:
        """Replace gate/up_proj by one projection (see `Attention.fuse`)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = _fused(self.gate_up_proj, "gate_up_proj")(x)
        return self.down_proj(silu_and_mul(gate_up))


def _concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the parts' outputs side by side (same input)."""
    w = parts[0].weight
    fused = nn.Linear(
        w.shape[1],
        sum(p.out_features for p in parts),
        bias=parts[0].bias is not None,
        device="meta",
        dtype=w.dtype,
    )
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def _fused(layer: nn.Linear | None, name: str) -> nn.Linear:
    if layer is None:
        raise RuntimeError(f"{name} is missing: call CausalLM.fuse_projections() after loading the weights")
    return layer


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, group: TensorParallelGroup | None = None, **kw: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)
        self.self_attn = Attention(arch, group, **kw)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)
        self.mlp = MLP(arch, group, **kw)

    def attention_inputs(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_out: torch.Tensor | None = None,
        k_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.qkv(self.input_layernorm(h), cos, sin, q_out, k_out)

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """h: residual [B, T, hidden]; attn: attention output [B, T, Hq * d]."""
        o = self.self_attn.o_proj(attn)
        norm = self.post_attention_layernorm  # the residual add fused into it
        normed, h = add_rms_norm(o, h, norm.weight, norm.eps)
        return h + self.mlp(normed)

    def prefill_inputs(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spans: list[tuple[int, int]],
    ) -> None:
        """A prompt chunk's attention inputs, in place, one sub-chunk (`spans`) of ``h [N, hidden]`` at a
        time: rope writes ``q [Hq, N, d]`` and ``k [Hkv, N, d]`` (a cache's rows, say), ``v`` is copied."""
        for c0, c1 in spans:
            _, _, vv = self.attention_inputs(
                h[None, c0:c1], cos[c0:c1], sin[c0:c1], q[None, :, c0:c1], k[None, :, c0:c1]
            )
            v[:, c0:c1] = vv[0]

    def prefill_finish(self, h: torch.Tensor, attn: torch.Tensor, spans: list[tuple[int, int]]) -> None:
        """The token-wise rest of a prefill layer after attention ``attn [Hq, N, d]``, in place on ``h [N,
        hidden]`` one sub-chunk (`spans`) at a time: o projection, residual, MLP (`finish`)."""
        hq, d = attn.shape[0], attn.shape[2]
        for c0, c1 in spans:
            a = attn[:, c0:c1].transpose(0, 1).reshape(1, c1 - c0, hq * d)
            h[c0:c1] = self.finish(h[None, c0:c1], a)[0]


class Backbone(nn.Module):
    def __init__(self, arch: ModelArch, group: TensorParallelGroup | None = None, **kw: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, group, **kw)
        self.layers = nn.ModuleList(DecoderLayer(arch, group, **kw) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)


class CausalLM(nn.Module):
    """Weights and per-layer pieces; `shard/engine.py` runs them. `arch` is the whole model's; with a
    `group`, this rank builds its part and `self.arch` is the rank's view (`ModelArch.local`)."""

    def __init__(
        self,
        arch: ModelArch,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        group: TensorParallelGroup | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.arch, self.group = arch.local(size_of(group)), group
        self.model = Backbone(arch, group, **kw)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, group, device=device, dtype=dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(arch, device=device)

    def fuse_projections(self) -> CausalLM:
        """Fuse q/k/v and gate/up projections in every layer (after the weights are loaded; idempotent)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.model.layers)  # type: ignore[arg-type]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32: h [..., hidden] -> [..., vocab]."""
        return self.lm_head(self.model.norm(h)).float()
