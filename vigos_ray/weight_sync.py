"""Weight push from learner rank 0 to the rollout engines: bucketed, versioned, timed and checksum-verified.

The sender walks the student's weights in a fixed order (LoRA adapters merged into their base weights, already in
the rollout dtype) and packs them into byte buckets on the transport's device; after each bucket it sends the
bucket's digest. Receivers take the buckets one at a time: each is hashed where it arrived and handed to the
engine's loader only if its digest equals the sender's, so a receiver holds at most two buckets, never a second
copy of the model, and a corrupted bucket is never loaded. A receiver that refused a bucket (or lost the group)
stays stale: it refuses to sample until a verified full push lands. How the bytes travel is a transport
(`vigos_ray/transports/`: gloo, nccl, ipc, object_store); on the engine side the receive runs inside vLLM's
weight-transfer lifecycle (`workers/weight_receiver.py`), in every engine worker (tensor-parallel rank).

A push is `full` (every tensor) or a delta: only the load units (`load_unit`) that hold a tensor the learner trains.
With LoRA the embeddings, the output head and every other frozen part never change, so after the first full push
of a lineage they stay in the engine. Every tensor is hashed on its own, so both ends can also digest the whole
state they hold (`state_digest`): the driver checks that each engine worker holds exactly what the learner last
sent, deltas included, not only that the last push arrived intact.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vigos_ray.transports import PushGroupError, Transport

__all__ = ["PushGroupError"]  # raised by the transports; re-exported for the callers of a push

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorSpec:
    name: str  # Hugging Face checkpoint name, as vLLM's loader expects it
    shape: tuple[int, ...]
    dtype: str  # key of DTYPES

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * DTYPES[self.dtype].itemsize


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class PushReport:
    version: int
    bytes: int
    seconds: float
    checksum: str  # digest of the tensors this push carried
    transport: str
    state: str = ""  # digest of every tensor the receivers should now hold (`state_digest`)
    full: bool = True  # every tensor, or only the units that can change

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


@dataclass(frozen=True)
class Sent:
    """What learner rank 0 returns from a push (the other ranks only gather, and return None)."""

    report: PushReport
    handles: list  # what the receivers fetch the push from (object_store); empty for a streaming transport


@dataclass(frozen=True)
class PushReceipt:
    """What one rollout worker confirms after loading a push."""

    worker: int
    version: int
    checksum: str  # digest of the tensors that arrived
    state: str  # digest of every tensor the worker now holds
    bytes: int
    receive_s: float  # taking every bucket and loading it (they overlap)
    apply_s: float  # finishing the engine's reload and resetting its caches
    engine_workers: int = 1  # each took the whole push and holds the same digests

    def matches(self, report: PushReport) -> bool:
        return (self.checksum, self.state, self.version) == (report.checksum, report.state, report.version)


def merged_weights(named: Iterable[tuple[str, torch.Tensor]], lora_scaling: float = 1.0):
    """Full weights under their Hugging Face names, with peft LoRA pairs merged: W + scaling * B @ A.

    Expects peft's parameter order within a wrapped layer: base_layer.weight, [base_layer.bias], lora_A, lora_B.
    """
    base: dict[str, torch.Tensor] = {}
    lora_a: dict[str, torch.Tensor] = {}
    for name, t in named:
        if ".base_layer." in name:
            prefix, _, leaf = name.partition(".base_layer.")
            if leaf == "weight":
                base[prefix] = t
            else:
                yield f"{prefix}.{leaf}", t
        elif ".lora_A." in name:
            lora_a[name.partition(".lora_A.")[0]] = t
        elif ".lora_B." in name:
            prefix = name.partition(".lora_B.")[0]
            a, w = lora_a.pop(prefix), base.pop(prefix)
            yield f"{prefix}.weight", w + lora_scaling * (t.to(w.dtype) @ a.to(w.dtype))
        else:
            yield name, t
    if base or lora_a:
        raise ValueError(f"LoRA layers without both adapters: {sorted(set(base) | set(lora_a))[:3]}")


def merged_name(name: str) -> str:
    """The pushed (Hugging Face) name a student parameter ends up in: peft's LoRA parts name their base weight."""
    if ".base_layer." in name:
        return name.replace(".base_layer.", ".")
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            return name.partition(part)[0] + ".weight"
    return name


def load_unit(name: str) -> str:
    """The part of the model a tensor is reloaded with: the numbered block it lives in (`...layers.3`), else its
    module. An engine fuses tensors into one kernel only within such a unit (q/k/v with their biases, gate/up), and
    reloads a fused layer correctly only from all of its parts, so a delta push sends whole units."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name.rpartition(".")[0]


def changing_specs(specs: Sequence[TensorSpec], trained: Iterable[str]) -> list[TensorSpec]:
    """The specs of a delta push: every tensor of each load unit that holds a `trained` (pushed) name."""
    units = {load_unit(name) for name in trained}
    return [spec for spec in specs if load_unit(spec.name) in units]


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive spec indices per bucket; a tensor larger than the bucket size travels alone."""
    buckets: list[list[int]] = [[]]
    size = 0
    for i, spec in enumerate(specs):
        if buckets[-1] and size + spec.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += spec.nbytes
    return [b for b in buckets if b]


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    out, offset = [], 0
    for spec in specs:
        n = spec.nbytes
        out.append(buffer[offset : offset + n].view(DTYPES[spec.dtype]).reshape(spec.shape))
        offset += n
    return out


class WeightSyncError(RuntimeError):
    """What arrived differs from what was sent; the receiver stays stale."""


class Digests:
    """A digest of every tensor's bytes, by name, in the order they were added; sender and receivers must agree.
    BLAKE2b for bytes in host memory; for bytes on a GPU a checksum computed there (`device_checksum`), so a push
    between GPUs is verified without copying it to the host."""

    def __init__(self):
        self.by_name: dict[str, str] = {}

    def add(self, bucket: torch.Tensor, specs: Sequence[TensorSpec]) -> None:
        """Hash each tensor packed in `bucket` (in `specs` order), in place: no copy, and hashlib releases the GIL
        on large buffers, so a helper thread hashes while the next bucket is packed or on the wire."""
        if bucket.device.type != "cpu":
            offsets = [0]
            for spec in specs:
                offsets.append(offsets[-1] + spec.nbytes)
            sums = [device_checksum(bucket[lo:hi]) for lo, hi in zip(offsets, offsets[1:], strict=False)]
            for spec, (s1, s2) in zip(specs, torch.stack([torch.stack(x) for x in sums]).tolist(), strict=True):
                self.by_name[spec.name] = f"{spec.nbytes:x}.{s1 % 2**64:016x}{s2 % 2**64:016x}"
            return
        data, offset = memoryview(bucket.numpy()), 0
        for spec in specs:
            self.by_name[spec.name] = hashlib.blake2b(data[offset : offset + spec.nbytes], digest_size=16).hexdigest()
            offset += spec.nbytes

    def hexdigest(self, names: Iterable[str] | None = None) -> str:
        """One digest over the tensors added (or over `names`), in order: what a push (or a bucket) carried."""
        names = self.by_name if names is None else names
        return combine((name, self.by_name[name]) for name in names)


def device_checksum(data: torch.Tensor, words_per_chunk: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """Two wrapping sums over the 8-byte words of `data` (uint8), computed on its device: plain, and weighted by
    position (Fletcher-style), so a flipped bit or two swapped words change it. Returned as 0-d int64 tensors on
    the device (read them together, one synchronisation per bucket); the weights are made chunk by chunk, so the
    extra memory is bounded by `words_per_chunk`."""
    n = data.numel()
    if n % 8 or data.storage_offset() % 8:  # words must be whole and aligned: a padded copy
        data = torch.cat([data, data.new_zeros(-n % 8)])
    words = data.view(torch.int64)
    plain = torch.zeros((), dtype=torch.int64, device=data.device)
    weighted = torch.zeros((), dtype=torch.int64, device=data.device)
    for lo in range(0, words.numel(), words_per_chunk):
        chunk = words[lo : lo + words_per_chunk]
        plain += chunk.sum()
        position = torch.arange(lo + 1, lo + 1 + chunk.numel(), dtype=torch.int64, device=data.device)
        weighted += (chunk * position).sum()
    return plain, weighted


def combine(digests: Iterable[tuple[str, str]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in digests:
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()


def state_digest(held: dict[str, str]) -> str:
    """One digest over every tensor held (name order): equal on two ends iff they hold the same bytes per name."""
    return combine(sorted(held.items()))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_address(_worker=None) -> tuple[str, int]:
    """This node's address and a free port on it: where a rank 0 hosts a rendezvous (`_worker`: run in an actor,
    `WorkerGroup.call_all(free_address)` or `__ray_call__`)."""
    host = node_ip()
    return host, free_port(host)


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (plain processes in tests)
        return "127.0.0.1"


DIGEST_BYTES = 16  # the message after each bucket: the bucket's digest


def _digest_message(hexdigest: str, device: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(hexdigest), dtype=torch.uint8).to(device)


def send(
    weights: Iterator[tuple[str, torch.Tensor]], specs: Sequence[TensorSpec], bucket_bytes: int, transport: Transport
) -> tuple[Digests, int]:
    """Send `weights` (in `specs` order) bucket by bucket, each followed by its digest; returns (per-tensor
    digests, bytes).

    Pipelined: bucket k+1 is cast and packed while bucket k is on the wire, and a helper thread hashes each bucket
    while it travels, so at most two buckets are alive. Each tensor is copied into its bucket as soon as it is
    yielded, so `weights` may hand out memory it reuses right after (an FSDP unit's gathered view)."""
    digests, in_flight = Digests(), []
    with ThreadPoolExecutor(1) as hasher:
        for bucket in plan_buckets(specs, bucket_bytes):
            bucket_specs = [specs[i] for i in bucket]
            buffer = torch.empty(sum(s.nbytes for s in bucket_specs), dtype=torch.uint8, device=transport.device)
            offset = 0
            for spec in bucket_specs:  # each tensor is copied in as it arrives: the sender may reuse its memory after
                name, t = next(weights)
                if name != spec.name or tuple(t.shape) != spec.shape:
                    raise RuntimeError(f"weight {name} {tuple(t.shape)} does not match the announced {spec}")
                copy_cast(buffer, offset, t, spec)
                offset += spec.nbytes
            hashed = hasher.submit(digests.add, buffer, bucket_specs)
            in_flight.append(transport.send(buffer))
            hashed.result()
            names = [s.name for s in bucket_specs]
            in_flight.append(transport.send(_digest_message(digests.hexdigest(names), transport.device)))
            while len(in_flight) > 2:  # the bucket before this one has left: its memory may go
                in_flight.pop(0)()
        while in_flight:
            in_flight.pop(0)()
    return digests, sum(s.nbytes for s in specs)


def copy_cast(buffer: torch.Tensor, offset: int, t: torch.Tensor, spec: TensorSpec) -> None:
    """`t` cast to its spec's dtype while it is copied into `buffer` at `offset` (a single pass; none when `t` is
    already in that dtype, as the learner's gathered weights are)."""
    dtype = DTYPES[spec.dtype]
    t = t.detach()
    if offset % dtype.itemsize == 0:
        buffer[offset : offset + spec.nbytes].view(dtype).view(spec.shape).copy_(t)
    else:  # an odd offset after a smaller dtype: cast first, then copy the bytes
        buffer[offset : offset + spec.nbytes] = t.to(dtype).contiguous().reshape(-1).view(torch.uint8)


Loader = Callable[[list[tuple[str, torch.Tensor]]], None]


def receive(
    specs: Sequence[TensorSpec], bucket_bytes: int, transport: Transport, load: Loader | None
) -> tuple[Digests, int]:
    """Every bucket of a push, each verified against the digest the sender sent after it before `load` gets it;
    returns (per-tensor digests, bytes). The next bucket arrives while this one is hashed and loaded, so at most
    two are held. A bucket whose digest differs is not loaded: the rest of the push is still taken (the sender
    is not left waiting for a receiver that gave up) but not loaded, and WeightSyncError is raised at the end.
    `load=None`: take and verify the push without loading it."""
    buckets = [[specs[i] for i in bucket] for bucket in plan_buckets(specs, bucket_bytes)]

    def post(bucket_specs):
        return transport.recv(sum(s.nbytes for s in bucket_specs)), transport.recv(DIGEST_BYTES)

    digests, total, failure = Digests(), 0, None
    posted = post(buckets[0]) if buckets else None
    for k, bucket_specs in enumerate(buckets):
        (data, digest), posted = posted, (post(buckets[k + 1]) if k + 1 < len(buckets) else None)
        buffer, expected = data(), bytes(digest().cpu().tolist()).hex()
        total += buffer.numel()
        if failure is not None:
            continue
        digests.add(buffer, bucket_specs)
        arrived = digests.hexdigest([s.name for s in bucket_specs])
        if arrived != expected:
            failure = WeightSyncError(f"bucket {k} ({bucket_specs[0].name}, ...) arrived with checksum {arrived}, "
                                      f"the sender sent {expected}; it was not loaded")  # fmt: skip
        elif load is not None:
            try:
                load(list(zip([s.name for s in bucket_specs], unpack(buffer, bucket_specs), strict=True)))
            except Exception as err:  # noqa: BLE001 -- re-raised once the sender is done
                failure = err
    if failure is not None:
        raise failure
    return digests, total
