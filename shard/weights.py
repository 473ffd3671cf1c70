"""Build a model and fill it from a Hugging Face safetensors checkpoint, tensor by tensor, on its device.

Parameters are created on the meta device and materialised directly on the target device; each checkpoint
tensor is read (straight to that device) and copied into its parameter, so no second full copy of the
weights ever exists in host or device memory. `build_model(..., load_format="dummy")` fills the same model
with random weights instead (only config.json is read).

Tensor parallelism: with a `TensorParallelGroup`, each rank builds its part of the model and reads only its
slice of each checkpoint tensor (safetensors slices, through each parameter's `ShardSpec`), every rank at
the same time in its own process. Dummy weights are the one-rank weights sliced: each rank draws every full
tensor from the same seeded generator and keeps its part, so TP=k computes what TP=1 does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from entropyinfer.errors import CheckpointNotFoundError
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.config import check_load_format
from entropyinfer.shard.layers import rope_inv_freq
from entropyinfer.shard.model import CausalLM
from entropyinfer.shard.parallel.group import TensorParallelGroup
from entropyinfer.shard.parallel.linear import ShardSpec, TensorSource, load_param, shard_specs

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointNotFoundError(f"{folder} holds no *.safetensors files; convert the checkpoint first")
    return files


def iter_checkpoint(folder: Path, device: torch.device) -> Iterator[tuple[str, TensorSource]]:
    """(name, safetensors slice) of every checkpoint tensor: nothing is read until the slice is indexed."""
    dev = "cpu" if device.type == "cpu" else str(device)
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt", device=dev) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_slice(name)


def empty_model(
    arch: ModelArch, device: torch.device, dtype: torch.dtype, group: TensorParallelGroup | None = None
) -> CausalLM:
    """Allocate (uninitialised) parameters on `device` (this rank's part, with a group); rope frequencies
    are computed, not loaded."""
    with torch.device("meta"):
        model = CausalLM(arch, dtype=dtype, group=group)
    _materialize(model, device)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.inv_freq = rope_inv_freq(arch).to(device)
    return model.eval().requires_grad_(False)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """`to_empty` with plain `torch.empty` (to_empty's `empty_like` of a meta tensor first imports torch's
    meta-tensor references, about a second per process); tied parameters come apart (re-tied after)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            empty = torch.empty(p.shape, device=device, dtype=p.dtype)
            module.register_parameter(name, nn.Parameter(empty, requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty(b.shape, device=device, dtype=b.dtype))


def build_model(
    folder: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str = "auto",
    group: TensorParallelGroup | None = None,
) -> CausalLM:
    """The model of a checkpoint folder (this rank's part, with a group): its safetensors weights
    ("auto"), or random weights of its shape ("dummy": `random_model`, seed 0, so every load of a folder
    gets the same weights)."""
    check_load_format(load_format)
    if load_format == "dummy":
        return random_model(ModelArch.from_folder(folder), device, dtype, group=group)
    return load_model(folder, device, dtype, group)


def load_model(
    folder: str | Path, device: torch.device, dtype: torch.dtype, group: TensorParallelGroup | None = None
) -> CausalLM:
    folder = Path(folder)
    arch = ModelArch.from_folder(folder)
    model = empty_model(arch, device, dtype, group)
    params = dict(model.named_parameters(remove_duplicate=False))
    specs = shard_specs(model)
    missing = set(params)
    for name, src in iter_checkpoint(folder, device):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        param = params.get(name)
        if param is None:
            raise CheckpointNotFoundError(
                f"checkpoint tensor {name!r} has no place in the {arch.model_type} model"
            )
        load_param(param, src, specs.get(name), name)  # this rank's slice only
        missing.discard(name)
    if arch.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CheckpointNotFoundError(f"checkpoint {folder} lacks tensors: {', '.join(sorted(missing)[:8])}")
    del params  # so that fusing frees each layer's separate projections as it goes
    return model.fuse_projections()


def model_from_state_dict(
    arch: ModelArch, state_dict: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Wrap existing tensors (e.g. a transformers model's, same names); only the fused q|k|v and gate|up
    projections are new tensors."""
    with torch.device("meta"):
        model = CausalLM(arch, dtype=dtype)
    wanted = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    model.load_state_dict(wanted, strict=not arch.tie_word_embeddings, assign=True)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.inv_freq = rope_inv_freq(arch).to(device)
    return model.eval().requires_grad_(False).fuse_projections()


def random_model(
    arch: ModelArch,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    group: TensorParallelGroup | None = None,
) -> CausalLM:
    """Random weights of a real shape (for speed benchmarks): N(0, 0.02) linears, unit norms. With a
    group, this rank's slice of the one-rank weights (each full tensor drawn, in the same order)."""
    model = empty_model(arch, device, dtype, group)
    gen = torch.Generator(device=device).manual_seed(seed)
    specs = shard_specs(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            spec = specs.get(name, ShardSpec(tuple(p.shape)))
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif tuple(p.shape) == spec.full_shape:  # the whole tensor (one rank)
                p.normal_(0.0, 0.02, generator=gen)
            else:
                full = torch.empty(spec.full_shape, device=device, dtype=dtype)
                load_param(p, full.normal_(0.0, 0.02, generator=gen), spec, name)
                del full
    return model.fuse_projections()
