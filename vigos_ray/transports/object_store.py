"""`object_store`: each message is put once into Ray's object store; receivers fetch the references after the
sender returns, so the sender never waits for them (async mode: a rollout worker loads the push when its sampling
call in flight ends). Receivers must be Ray workers: an engine with tensor parallelism runs its workers in
processes of its own, so this transport serves `rollout.tensor_parallel_size: 1` only."""

from __future__ import annotations

import torch

from vigos_ray.transports import Transport


class ObjectStore(Transport):
    device = "cpu"
    streams = False

    def __init__(self, endpoint, rank):
        super().__init__(endpoint, rank)
        self._refs: list = []

    def send(self, message: torch.Tensor):
        import ray

        self._refs.append(ray.put(message))
        return lambda: None

    def handles(self) -> list:
        """The references of the push just sent (the caller keeps them alive until every receiver has them)."""
        refs, self._refs = self._refs, []
        return refs

    def expect(self, handles: list) -> None:
        self._refs = list(handles)

    def recv(self, nbytes: int):
        import ray

        if not self._refs:
            raise RuntimeError("object_store: a receive with no reference left; pass the push's handles first")
        ref = self._refs.pop(0)

        def received() -> torch.Tensor:
            message = ray.get(ref)
            if message.numel() != nbytes:
                raise RuntimeError(f"object_store: expected a message of {nbytes} bytes, got {message.numel()}")
            return message

        return received


TRANSPORT = ObjectStore
