"""`gloo`: broadcasts of CPU buffers (rollout engines and learner on CPU: the default here, and what CI runs)."""

from __future__ import annotations

import torch

from vigos_ray.transports import ProcessGroupTransport


class Gloo(ProcessGroupTransport):
    device = "cpu"

    def make_group(self, store, rank, world_size, timeout):
        return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)


TRANSPORT = Gloo
