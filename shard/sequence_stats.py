"""What a finished sequence reports in its `RequestOutput.stats` (decode speed, KV kept, compression),
filled by `EngineCore` when the sequence ends."""

from __future__ import annotations

import torch

from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.sequence import Sequence


def fill_stats(seq: Sequence, arch: ModelArch, kv_replicas: int, element_size: int) -> None:
    """Fill ``seq.stats`` at its end: `arch` the whole model's, `kv_replicas` how many ranks hold each KV
    head, `element_size` the bytes of one KV element."""
    st, replicas = seq.stats, kv_replicas
    st["generated_tokens"] = len(seq.output_ids)
    st["decode_ms_per_token"] = seq.decode_seconds * 1e3 / seq.decoded_tokens if seq.decoded_tokens else 0.0
    st["preemptions"] = seq.preemptions
    lengths = seq.kv_lengths if seq.kv_lengths is not None else torch.zeros(1, 1, dtype=torch.int32)
    if seq.compressed:
        st["kv_tokens_kept"] = float(lengths.double().mean())
        st["kv_tokens_kept_per_layer"] = lengths.double().mean(dim=1).tolist()
    else:
        st["kv_tokens_kept"] = int(lengths.max())
        st["kv_tokens_kept_per_layer"] = [float(lengths.max())] * arch.num_layers
    st["kv_tokens_kept_total"] = round(sum(st["kv_tokens_kept_per_layer"]) * arch.num_kv_heads)
    per_head_token = 2 * arch.head_dim * element_size
    st["kv_bytes"] = (
        int(lengths.long().sum()) // replicas * per_head_token
        if seq.compressed
        else int(lengths.max()) * arch.kv_bytes_per_token(element_size)
    )
    kv = seq.request.kv
    if kv is None or seq.params.max_tokens <= 1:
        st["kv_compression"] = "none"
    else:
        st.update(
            kv_compression=kv.method,
            kv_capacity=kv.capacity,
            kv_compressions=seq.compressions,
            compression_ms=seq.compression_ms,
        )
        if seq.kv_bytes_before is not None:
            st["kv_bytes_before"] = seq.kv_bytes_before
        if kv.head_capacity != "uniform" and seq.capacities is not None:
            st["kv_head_capacities"] = seq.capacities[:, ::replicas].tolist()  # one row per KV head
    st.setdefault("kv_bytes_before", st["kv_bytes"])
