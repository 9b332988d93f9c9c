"""Sharded start-up of the learner: no rank ever holds the whole model.

The student is built with its parameters on the meta device (buffers such as the rotary `inv_freq` are computed
as usual: they are small and no checkpoint holds them), cut by `fully_shard`, and only then given memory: each rank
reads from the checkpoint's safetensors just the rows of each parameter that its shard holds, straight into the
shard's memory (no full tensor is read, no file is memory-mapped). LoRA adapters are initialised from a generator
seeded by the run's seed and the parameter's name, so every rank draws the same full matrix and keeps its rows,
and a full load gives the same values.
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
    if not hasattr(param, "to_local"):  # not sharded
        return 0, param.shape[0]
    start, stop, _ = _row_range(param.shape[0])
    held = param.to_local().shape[0]
    if held != stop - start:
        raise RuntimeError(f"shard of {tuple(param.shape)} on rank {dist.get_rank()}: {held} rows, not {stop - start}")
    return start, stop


def local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


class CheckpointRows:
    """Rows of a checkpoint's tensors by the model's parameter names (transformers' renaming of older layouts, such
    as Qwen2.5-VL's `model.layers.*` for `model.language_model.layers.*`, applied to the checkpoint's keys).

    Rows of a row-major tensor are one byte range of its safetensors file: they are read with `readinto` straight
    into the destination (through one buffer of the rows' size where the dtype or device differs), not through
    a memory map, so the file's pages never count in this process's memory."""

    def __init__(self, folder: str | Path, model: nn.Module):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() \
            else sorted(folder.glob("*.safetensors"))  # fmt: skip
        rename = _renamer(model)
        self.where: dict[str, tuple[Path, torch.dtype, list[int], int]] = {}
        for file in files:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, entry in header.items():
                if key != "__metadata__":
                    begin = 8 + size + entry["data_offsets"][0]
                    self.where[rename(key)] = (file, SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], begin)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of tensor `name` (dim 0) into `out`, cast to its dtype and device."""
        if name not in self.where:
            raise KeyError(f"{name} is not in the checkpoint (it holds {sorted(self.where)[:3]}...)")
        file, dtype, shape, offset = self.where[name]
        if list(out.shape) != [stop - start, *shape[1:]]:
            raise ValueError(f"{name}: rows {start}:{stop} of {shape} do not fit a tensor of {tuple(out.shape)}")
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buf = out if direct else torch.empty(tuple(out.shape), dtype=dtype)
        row_bytes = buf[0].numel() * buf.element_size() if len(buf) else 0
        with file.open("rb", buffering=0) as f:
            f.seek(offset + start * row_bytes)
            view = memoryview(buf.view(-1).view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise OSError(f"{file} ended inside {name}")
        if not direct:
            out.copy_(buf)


def _renamer(model: nn.Module):
    """checkpoint key -> model parameter name, by the renamings transformers applies when it loads `model`."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    if any(isinstance(t, WeightConverter) for t in transforms):  # merges or splits tensors: not a row slice
        raise ValueError(f"learner.load=sharded reads tensors as stored, but {type(model).__name__} converts its "
                         "checkpoint's tensors when it loads; set learner.load=full")  # fmt: skip
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
            checkpoint.read_into(name.replace(".base_layer.", "."), start, stop, local(param))


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


class FrozenHead:
    """A frozen output head [V', d] held as this rank's rows (`torch.chunk` of dim 0, padded to equal size), gathered
    whole only while a train step uses it (`gathered`): at rest a rank holds 1/world of it."""

    def __init__(self, rows: torch.Tensor, total_rows: int):
        self.rows, self.total_rows = rows, total_rows
        self.full: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: CheckpointRows, name: str, shape, dtype, device) -> FrozenHead:
        start, stop, chunk = _row_range(shape[0])
        rows = torch.zeros((chunk, *shape[1:]), dtype=dtype, device=device)
        if stop > start:
            checkpoint.read_into(name, start, stop, rows[: stop - start])
        return cls(rows, shape[0])

    @classmethod
    def from_tensor(cls, full: torch.Tensor, dtype) -> FrozenHead:
        start, stop, chunk = _row_range(full.shape[0])
        rows = torch.zeros((chunk, *full.shape[1:]), dtype=dtype, device=full.device)
        rows[: stop - start] = full[start:stop]
        return cls(rows, full.shape[0])

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """`self.full` is the whole head inside (a collective: every rank enters)."""
        if dist.get_world_size() == 1:  # this rank holds every row
            self.full = self.rows[: self.total_rows]
        else:
            parts = [torch.empty_like(self.rows) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, self.rows)
            self.full = torch.cat(parts)[: self.total_rows]
            del parts
        try:
            yield
        finally:
            self.full = None


def _row_range(n: int) -> tuple[int, int, int]:
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n), chunk
