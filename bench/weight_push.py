"""Weight push: seconds and GB/s by transport and bucket size, against a raw broadcast of the same bytes.

A sender actor (the learner rank 0's part: cast, pack into buckets, BLAKE2b checksum, send) and receiver actors
(the rollout workers' part: receive, checksum, unpack) on a local Ray cluster, with synthetic weights shaped like
a model's (a few large matrices, many small vectors) in bf16. `raw` broadcasts one flat buffer of the same size
over the same kind of gloo group, with no packing, checksum or unpacking: the bandwidth the transport allows.
Not included: the learner's all-gather of FSDP shards and vLLM's reload (bench/step.py measures the whole push).

    python bench/weight_push.py --mb 512 --receivers 1 --buckets 32 128 512
"""

from __future__ import annotations

import argparse
import time

from common import REPO, table


def model_like_specs(total_mb: int):
    """Tensor specs summing to about `total_mb`: per block, 4 square matrices and 2 small vectors, in bf16."""
    from vigos_ray.weight_sync import TensorSpec

    d = 1024
    specs, size, i = [], 0, 0
    while size < total_mb * 2**20:
        for name, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)), ("n1", (d,)), ("n2", (d,))):
            specs.append(TensorSpec(f"layers.{i}.{name}", shape, "bfloat16"))
            size += 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        i += 1
    return specs


class Member:
    """One member of a push group: rank 0 sends, the others receive."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.group = rank, world, None

    def address(self):
        from vigos_ray.weight_sync import free_port

        return "127.0.0.1", free_port("127.0.0.1")

    def join(self, host: str, port: int) -> None:
        from vigos_ray.weight_sync import SyncGroup

        self.group = SyncGroup(host, port, self.rank, self.world, 300.0)

    def raw(self, nbytes: int) -> float:
        import torch

        buffer = torch.ones(nbytes, dtype=torch.uint8) if self.rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        self.group.broadcast(buffer)
        return time.perf_counter() - t0

    def push(self, specs, bucket_bytes: int, transport: str, refs=None, expected: str = ""):
        import torch

        from vigos_ray import weight_sync

        t0 = time.perf_counter()
        if self.rank == 0:
            weights = ((s.name, torch.ones(s.shape, dtype=torch.float32)) for s in specs)  # cast to bf16 on send
            digests, _, refs = weight_sync.send(weights, specs, bucket_bytes, transport, self.group)
            return time.perf_counter() - t0, digests.hexdigest(), refs
        _, digests, _ = weight_sync.receive(specs, bucket_bytes, transport, self.group, refs or [], expected)
        return time.perf_counter() - t0, digests.hexdigest(), None


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="size of the weights pushed")
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--buckets", type=int, nargs="+", default=[32, 128, 512], help="bucket sizes in MB")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    specs = model_like_specs(args.mb)
    nbytes = sum(s.nbytes for s in specs)
    ray.init(
        num_cpus=2 + args.receivers,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    world = 1 + args.receivers
    members = [ray.remote(num_cpus=1)(Member).remote(r, world) for r in range(world)]
    host, port = ray.get(members[0].address.remote())
    ray.get([m.join.remote(host, port) for m in members])

    def timed(fn) -> float:
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return min(runs)  # the least disturbed run of a shared 2-core machine

    raw_s = timed(lambda: ray.get([m.raw.remote(nbytes) for m in members]))
    rows = [["raw broadcast (baseline)", "-", f"{raw_s:.3f}", f"{nbytes / raw_s / 1e9:.2f}", "1.00"]]
    for mb in args.buckets:
        bucket = mb * 2**20
        push_s = timed(lambda b=bucket: ray.get([m.push.remote(specs, b, "collective") for m in members]))
        rows.append(["collective (gloo)", mb, f"{push_s:.3f}", f"{nbytes / push_s / 1e9:.2f}", f"{raw_s / push_s:.2f}"])

    def object_store(bucket: int) -> None:
        _, checksum, refs = ray.get(members[0].push.remote(specs, bucket, "object_store"))
        ray.get([m.push.remote(specs, bucket, "object_store", refs, checksum) for m in members[1:]])

    for mb in args.buckets:
        store_s = timed(lambda b=mb * 2**20: object_store(b))
        rows.append(["object_store (Ray)", mb, f"{store_s:.3f}", f"{nbytes / store_s / 1e9:.2f}",
                     f"{raw_s / store_s:.2f}"])  # fmt: skip
    table(f"weight push of {nbytes / 1e6:,.0f} MB (bf16, {len(specs)} tensors) to {args.receivers} receiver(s), "
          f"best of {args.repeats}; 'vs raw' = raw seconds / push seconds",
          ["transport", "bucket MB", "seconds", "GB/s", "vs raw"], rows)  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
