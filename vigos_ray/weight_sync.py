"""Weight push from learner rank 0 to the rollout workers: bucketed, versioned, timed and checksum-verified.

The sender walks the student's weights in a fixed order (LoRA adapters merged into their base weights, cast to
the rollout dtype) and packs them into byte buckets. Transports:
- `collective`: a broadcast per bucket over a process group of its own (learner rank 0 + every rollout worker),
  built on its own TCP store: the learner's default group is its FSDP group and vLLM's in-process engine owns
  the rollout worker's default group, so neither can be used.
- `object_store`: each bucket is put once into Ray's object store; rollout workers fetch the references.
Receivers hash what arrived and the driver compares it with what was sent; a mismatch fails the step loudly and
leaves the rollout worker stale (it refuses to sample) instead of sampling from corrupted weights.

A push is `full` (every tensor) or a delta: only the load units (`load_unit`) that hold a tensor the learner trains.
With LoRA the embeddings, the output head and every other frozen part never change, so after the first full push
of a lineage they stay in the engine. Every tensor is hashed on its own, so both ends can also digest the whole
state they hold (`state_digest`): the driver checks that each engine holds exactly what the learner last sent,
deltas included, not only that the last push arrived intact.
"""

from __future__ import annotations

import gc
import hashlib
import socket
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch

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
class PushReceipt:
    """What one rollout worker confirms after loading a push."""

    worker: int
    version: int
    checksum: str  # digest of the tensors that arrived
    state: str  # digest of every tensor the worker now holds
    bytes: int
    receive_s: float
    apply_s: float  # loading into the engine and resetting its caches

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


class PushGroupError(WeightSyncError):
    """The weight-push group broke mid-push (a member died or timed out); re-form the group and push again."""


class Digests:
    """BLAKE2b of every tensor's bytes, by name, in the order they were added; sender and receivers must agree."""

    def __init__(self):
        self.by_name: dict[str, str] = {}

    def add(self, bucket: torch.Tensor, specs: Sequence[TensorSpec]) -> None:
        """Hash each tensor packed in `bucket` (in `specs` order), in place: no copy, and hashlib releases the GIL
        on large buffers, so a helper thread hashes while the next bucket is packed or on the wire."""
        data, offset = memoryview(bucket.numpy()), 0
        for spec in specs:
            self.by_name[spec.name] = hashlib.blake2b(data[offset : offset + spec.nbytes], digest_size=16).hexdigest()
            offset += spec.nbytes

    def hexdigest(self) -> str:
        """One digest over the tensors added, in order: what a push carried."""
        return combine(self.by_name.items())


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


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (plain processes in tests)
        return "127.0.0.1"


class SyncGroup:
    """A gloo process group of its own, on its own TCP store (rank 0 hosts the store), for weight pushes.

    A failed broadcast (a member died: gloo notices the closed connection at once; a member hung: after
    `timeout_s`) raises PushGroupError and closes this end of the group, which makes the members still waiting in
    it fail at once too instead of at their timeout. A closed group refuses further use: form a new one."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0):
        self._store = torch.distributed.TCPStore(host, port, world_size, rank == 0, timedelta(seconds=timeout_s))
        self._pg = torch.distributed.ProcessGroupGloo(self._store, rank, world_size, timedelta(seconds=timeout_s))

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's `buffer` into every member's `buffer`."""
        self.broadcast_async(buffer)()

    def broadcast_async(self, buffer: torch.Tensor):
        """Start the broadcast of `buffer` and return a function that waits for it. Broadcasts complete in the
        order they were started; the caller must not touch `buffer` before waiting."""
        if self._pg is None:
            raise PushGroupError("this weight-push group was closed after a failure; form a new one")
        try:
            work = self._pg.broadcast(buffer, 0)
        except RuntimeError as err:
            self._fail(err)

        def wait() -> None:
            try:
                work.wait()
            except RuntimeError as err:
                self._fail(err)

        return wait

    def _fail(self, err: RuntimeError):
        message = f"the weight-push group broke: {str(err).splitlines()[0]}"
        del err
        self.close()
        raise PushGroupError(message)

    def close(self) -> None:
        self._pg = self._store = None
        gc.collect()  # drop the last reference now: gloo closes its connections when the group is destroyed


def send(
    weights: Iterator[tuple[str, torch.Tensor]],
    specs: Sequence[TensorSpec],
    bucket_bytes: int,
    transport: str,
    group=None,
) -> tuple[Digests, int, list]:
    """Send `weights` (in `specs` order) bucket by bucket; returns (per-tensor digests, bytes, object refs or []).

    Pipelined: bucket k+1 is cast and packed while bucket k is on the wire, and a helper thread hashes each bucket
    once it is packed, so the wire, the packing and the hashing overlap. Each tensor is copied into its bucket as
    soon as it is yielded, so `weights` may hand out memory it reuses right after (an FSDP unit's gathered view)."""
    digests, total, refs = Digests(), 0, []
    with ThreadPoolExecutor(1) as hasher:  # one thread: buckets are hashed in order
        hashed, wait = [], None
        for bucket in plan_buckets(specs, bucket_bytes):
            buffer = torch.empty(sum(specs[i].nbytes for i in bucket), dtype=torch.uint8)
            offset = 0
            for i in bucket:  # each tensor is copied in as it arrives: the sender may reuse its memory after
                name, t = next(weights)
                spec = specs[i]
                if name != spec.name or tuple(t.shape) != spec.shape:
                    raise RuntimeError(f"weight {name} {tuple(t.shape)} does not match the announced {spec}")
                copy_cast(buffer, offset, t, spec)
                offset += spec.nbytes
            hashed.append(hasher.submit(digests.add, buffer, [specs[i] for i in bucket]))
            total += buffer.numel()
            if transport == "collective":
                if wait is not None:
                    wait()
                wait = group.broadcast_async(buffer)
            else:
                import ray

                refs.append(ray.put(buffer))
        if wait is not None:
            wait()
        for h in hashed:
            h.result()
    if transport == "collective":  # receivers verify before they apply anything
        group.broadcast(torch.frombuffer(bytearray.fromhex(digests.hexdigest()), dtype=torch.uint8))
    return digests, total, refs


def copy_cast(buffer: torch.Tensor, offset: int, t: torch.Tensor, spec: TensorSpec) -> None:
    """`t` cast to its spec's dtype while it is copied into `buffer` at `offset` (a single pass)."""
    dtype = DTYPES[spec.dtype]
    if offset % dtype.itemsize == 0:
        buffer[offset : offset + spec.nbytes].view(dtype).view(spec.shape).copy_(t.detach())
    else:  # an odd offset after a smaller dtype: cast first, then copy the bytes
        buffer[offset : offset + spec.nbytes] = pack([t.detach().to(dtype)])


def receive(specs: Sequence[TensorSpec], bucket_bytes: int, transport: str, group=None, refs=(), expected: str = ""):
    """Every bucket of a push, verified against the sender's checksum (broadcast last in `collective`, passed as
    `expected` with `object_store`); returns ([(name, tensor)], per-tensor digests, bytes) or raises
    WeightSyncError."""
    digests, total, named = Digests(), 0, []
    buckets = [[specs[i] for i in bucket] for bucket in plan_buckets(specs, bucket_bytes)]
    if transport == "collective":  # every receive is posted at once (the whole push is held until verified anyway)
        buffers = [torch.empty(sum(s.nbytes for s in b), dtype=torch.uint8) for b in buckets]
        waits = [group.broadcast_async(buffer) for buffer in buffers]
        digest = torch.empty(16, dtype=torch.uint8)
        waits.append(group.broadcast_async(digest))
    with ThreadPoolExecutor(1) as hasher:  # bucket k is hashed while bucket k+1 arrives
        hashed = []
        for k, bucket_specs in enumerate(buckets):
            if transport == "collective":
                waits[k]()
                buffer = buffers[k]
            else:
                import ray

                buffer = ray.get(refs[k])
            hashed.append(hasher.submit(digests.add, buffer, bucket_specs))
            total += buffer.numel()
            named += [(s.name, t) for s, t in zip(bucket_specs, unpack(buffer, bucket_specs), strict=True)]
        for h in hashed:
            h.result()
    if transport == "collective":
        waits[-1]()
        expected = bytes(digest.tolist()).hex()
    arrived = digests.hexdigest()
    if arrived != expected:
        raise WeightSyncError(f"weights arrived with checksum {arrived}, sender sent {expected}; not applied")
    return named, digests, total
