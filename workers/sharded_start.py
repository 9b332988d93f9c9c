"""Sharded start-up of the learner: no rank ever holds the whole model.

The student is built with its parameters on the meta device (buffers such as the rotary `inv_freq` are computed
as usual: they are small and no checkpoint holds them), cut by `fully_shard`, and only then given memory: each rank
reads from the checkpoint's safetensors just the rows of each parameter that its shard holds (`get_slice`, no full
tensor is read). LoRA adapters are initialised from a generator seeded by the run's seed and the parameter's
name, so every rank draws the same full matrix and keeps its rows, and a full load gives the same values.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put every parameter on the meta device as it is registered; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(path: str | Path) -> nn.Module:
    """The image-text model of folder `path` in fp32, parameters on meta (tied weights tied), in eval mode."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path))
    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model.eval()


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that this rank's shard of `param` holds (FSDP2's Shard(0): torch.chunk)."""
    n = param.shape[0]
    if not hasattr(param, "to_local"):  # not sharded
        return 0, n
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    held = param.to_local().shape[0]
    if held != stop - start:
        raise RuntimeError(f"shard of {tuple(param.shape)} on rank {rank}: {held} rows, expected {stop - start}")
    return start, stop


def local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


class CheckpointRows:
    """Rows of a checkpoint's tensors by the model's parameter names (transformers' renaming of older layouts, such
    as Qwen2.5-VL's `model.layers.*` for `model.language_model.layers.*`, applied to the checkpoint's keys)."""

    def __init__(self, folder: str | Path, model: nn.Module):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            by_key = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            by_key = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    by_key.update(dict.fromkeys(f.keys(), file))
        rename = _renamer(model)
        self.where = {rename(k): (k, file) for k, file in by_key.items()}
        self.files: dict[Path, object] = {}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise KeyError(f"{name} is not in the checkpoint (keys read as {sorted(self.where)[:4]}...)")
        key, file = self.where[name]
        if file not in self.files:
            self.files[file] = safe_open(str(file), framework="pt")
        return self.files[file].get_slice(key)[start:stop]


def _renamer(model: nn.Module):
    """checkpoint key -> model parameter name, by the renamings transformers applies when it loads `model`."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    if any(isinstance(t, WeightConverter) for t in transforms):  # merges or splits tensors: not a row slice
        raise NotImplementedError(f"{type(model).__name__} converts its checkpoint's tensors; use learner.load=full")
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    meta = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}  # names without LoRA
    return lambda key: rename_source_key(key, renamings, [], model.base_model_prefix, meta)[0]


@torch.no_grad()
def materialize(module: nn.Module, student: nn.Module, folder: str | Path, device: torch.device) -> None:
    """Give the sharded `module` (parameters on meta) memory on `device` and fill each rank's shards: the
    student's base weights from the checkpoint in `folder`, its buffers as they were computed at build time.
    LoRA adapters are left to `init_lora`."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    for name, b in module.named_buffers():
        b.copy_(buffers[name])
    checkpoint = CheckpointRows(folder, student)
    for name, param in student.named_parameters():
        if ".lora_" in name:
            continue
        start, stop = shard_rows(param)
        if stop > start:
            local(param).copy_(checkpoint.rows(name.replace(".base_layer.", "."), start, stop))


def lora_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """peft's default initial value of one LoRA matrix: A ~ kaiming_uniform(a=sqrt(5)), B = 0; drawn from a
    generator seeded by (`seed`, `name`), the same on every rank and for every way of loading."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(shape[1])  # kaiming_uniform with a=sqrt(5): gain sqrt(2/6), bound gain*sqrt(3/fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


@torch.no_grad()
def init_lora(student: nn.Module, seed: int) -> None:
    """Every LoRA matrix of `student` (sharded or not) set to `lora_init`: each rank writes its rows."""
    for name, param in student.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            start, stop = shard_rows(param)
            local(param).copy_(lora_init(name, tuple(param.shape), seed)[start:stop].to(param.dtype))
