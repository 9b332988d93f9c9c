"""How the bytes of a weight push travel from learner rank 0 to the engine workers of every rollout worker.

A transport moves opaque messages (uint8 tensors: a bucket of packed weights, then its 16-byte digest) from rank 0
(the sender) to every other rank of one group, in the order they were sent. Everything else about a push (bucket
plan, checksums, versions, loading into the engine) lives in `vigos_ray/weight_sync.py` and is the same for every
transport. Each transport is one module of this package, named as `weight_sync.transport` names it, that sets
`TRANSPORT` to its class: adding a transport touches one file.

- `gloo`: broadcasts of CPU buffers over a gloo group on its own TCP store (the CPU default).
- `nccl`: broadcasts of GPU buffers over an NCCL group on its own TCP store (rollout engines on other GPUs).
- `ipc`: CUDA IPC handles through the TCP store (learner rank 0 and the engine on one GPU: NCCL refuses two
  members on one device); receivers copy each bucket out, then acknowledge it.
- `object_store`: each message is put into Ray's object store; receivers fetch the references after the sender
  returns (a push that does not wait for the receivers: async mode).

Ranks: 0 is the sender; an engine worker (one per tensor-parallel rank of an engine) is
`1 + worker_index * tensor_parallel_size + tp_rank`, so several rollout workers, each with several engine workers,
share one group.
"""

from __future__ import annotations

import gc
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch

Wait = Callable[[], None]


class PushGroupError(RuntimeError):
    """The group broke mid-push (a member died or timed out); form a new one and push again."""


@dataclass(frozen=True)
class Endpoint:
    """Where a push group meets: rank 0 hosts the TCP store at host:port."""

    transport: str
    host: str
    port: int
    world_size: int  # the sender and every engine worker of every rollout worker
    timeout_s: float = 300.0

    def as_dict(self) -> dict:
        return asdict(self)


class Transport(ABC):
    """One end of a push group. The sender calls `send`, receivers `recv`, each message in the same order."""

    device: ClassVar[str] = "cpu"  # where a message lives on both ends
    streams: ClassVar[bool] = True  # receivers take messages while they are sent; False: after (see `handles`)

    def __init__(self, endpoint: Endpoint, rank: int):
        self.endpoint, self.rank = endpoint, rank

    @abstractmethod
    def send(self, message: torch.Tensor) -> Wait:
        """Start sending `message` to every receiver; returns a function that waits for it. The caller must not
        touch `message` before waiting."""

    @abstractmethod
    def recv(self, nbytes: int) -> Callable[[], torch.Tensor]:
        """Post the receive of the next message (`nbytes` long); returns a function that waits for it and returns
        it, in memory the receiver owns (the sender may free or reuse its own copy right after)."""

    def handles(self) -> list:
        """After a push, what the receivers need besides the group to take it (`streams = False` only)."""
        return []

    def expect(self, handles: list) -> None:  # noqa: B027 -- a no-op for the transports that stream
        """Receiver: the `handles` of the push about to be received (`streams = False` only)."""

    def close(self) -> None:  # noqa: B027 -- nothing to release by default
        """Leave the group; a closed end refuses further use."""


class ProcessGroupTransport(Transport):
    """A broadcast per message over a torch process group of its own, on its own TCP store: the learner's default
    group is its FSDP group and each engine owns its worker's default group, so neither can be used.

    A failed broadcast (a member died: the backend notices the closed connection; a member hung: after
    `timeout_s`) raises PushGroupError and closes this end, which makes the members still waiting in it fail at
    once too instead of at their timeout."""

    def __init__(self, endpoint: Endpoint, rank: int):
        super().__init__(endpoint, rank)
        timeout = timedelta(seconds=endpoint.timeout_s)
        self._store = torch.distributed.TCPStore(endpoint.host, endpoint.port, endpoint.world_size, rank == 0, timeout)
        self._pg = self.make_group(self._store, rank, endpoint.world_size, timeout)

    @abstractmethod
    def make_group(self, store, rank: int, world_size: int, timeout: timedelta):
        """The torch process group of this backend on `store`."""

    def send(self, message: torch.Tensor) -> Wait:
        return self._broadcast(message)

    def recv(self, nbytes: int) -> Callable[[], torch.Tensor]:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        wait = self._broadcast(buffer)

        def received() -> torch.Tensor:
            wait()
            return buffer

        return received

    def _broadcast(self, buffer: torch.Tensor) -> Wait:
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
        gc.collect()  # drop the last reference now: the backend closes its connections when the group is destroyed


def transport_class(name: str) -> type[Transport]:
    """The transport named `name` (a module of this package that sets TRANSPORT)."""
    if name not in available():
        raise ValueError(f"unknown weight_sync.transport {name!r}; choose one of {sorted(available())} or auto")
    return importlib.import_module(f"{__name__}.{name}").TRANSPORT


def available() -> set[str]:
    """Every transport's name, without importing them (an NCCL or CUDA module may not load on this machine)."""
    return {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def open_transport(endpoint: Endpoint, rank: int) -> Transport:
    return transport_class(endpoint.transport)(endpoint, rank)


def visible_gpus(_actor=None) -> list[str]:
    """UUIDs of the GPUs this process sees (none on CPU); `_actor` lets an actor run it via `__ray_call__`."""
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def choose(learner_gpus: list[str], engine_gpus: list[list[str]], ahead: bool = False) -> str:
    """`weight_sync.transport: auto` from the GPUs learner rank 0 and each rollout worker see: when either end has
    none, object_store if the run samples `ahead` (async mode, engines that are Ray workers: the learner leaves
    the push in the object store and goes on while the engines finish sampling) else gloo; ipc when every engine
    runs on learner rank 0's GPU, nccl when none does."""
    if not learner_gpus or not all(engine_gpus):
        return "object_store" if ahead else "gloo"
    shared = [learner_gpus[0] in gpus for gpus in engine_gpus]
    if all(shared) and all(len(gpus) == 1 for gpus in engine_gpus):
        return "ipc"
    if not any(shared):
        return "nccl"
    raise ValueError(
        "some rollout workers share learner rank 0's GPU and some do not: no one transport reaches both (ipc needs "
        "the same GPU, nccl a GPU per member); place them apart or on the one GPU, or set weight_sync.transport"
    )
