"""Ray cluster set-up and the up-front resource check (before any actor starts, so nothing waits forever)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vigos_ray.config import Config

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The config asks for more than the Ray cluster has; the message names the keys to change."""


@dataclass(frozen=True)
class Demand:
    key: str  # config prefix, e.g. "rollout" or "teachers.reasoning"
    count: int  # actors that must be placed at start
    count_key: str
    cpus: float  # per actor
    gpus: float  # per actor


def demands(cfg: Config) -> list[Demand]:
    out = [Demand("rollout", cfg.rollout.workers, "rollout.workers", cfg.rollout.num_cpus, cfg.rollout.num_gpus)]
    for role, pool in cfg.teacher_pools().items():
        key = f"teachers.{role}"
        # a pool starts at max(min_workers, 1): the step needs one scorer of each role
        out.append(Demand(key, max(pool.min_workers, 1), f"{key}.min_workers", pool.num_cpus, pool.num_gpus))
    out.append(Demand("learner", cfg.learner.workers, "learner.workers", cfg.learner.num_cpus, cfg.learner.num_gpus))
    return out


def check_cluster_resources(cfg: Config, total: dict[str, float], per_node: list[dict[str, float]]) -> None:
    """Raise ResourceError if the actors to start cannot all be placed on a cluster with these resources."""
    for resource, attr in (("GPU", "gpus"), ("CPU", "cpus")):
        parts = [(d, d.count * getattr(d, attr)) for d in demands(cfg) if getattr(d, attr) > 0]
        need = sum(amount for _, amount in parts)
        have = total.get(resource, 0.0)
        if need > have + 1e-9:
            detail = ", ".join(f"{d.count_key}={d.count} x {d.key}.num_{attr}={getattr(d, attr):g}" for d, _ in parts)
            raise ResourceError(
                f"the config asks for {need:g} {resource}s ({detail}) but the Ray cluster has {have:g}. "
                f"Lower those keys, or run on a cluster with more {resource}s (run.ray_address / ray job submit)."
            )
        biggest = max((node.get(resource, 0.0) for node in per_node), default=0.0)
        for d, _ in parts:
            if getattr(d, attr) > biggest + 1e-9:
                raise ResourceError(
                    f"{d.key}.num_{attr}={getattr(d, attr):g} per actor, but the largest node has {biggest:g} "
                    f"{resource}s; one actor cannot span nodes. Lower {d.key}.num_{attr}."
                )


def stage_threads(cfg: Config, stage: str, cores: int) -> int:
    """torch threads for one CPU actor of `stage` ("rollout", "teachers", "learner") on a node with `cores`.

    `run.cpu_threads`, else the cores shared among the actors busy at the same time: in sync mode one stage runs
    at a time (sampling, then scoring by every pool at once, then training on every rank), so its actors share all
    cores; in async mode sampling runs beside scoring or training, so each side's actors count together."""
    if cfg.run.cpu_threads:
        return cfg.run.cpu_threads
    count = {"rollout": 0, "teachers": 0, "learner": 0}
    for d in demands(cfg):
        count[d.key.partition(".")[0]] += d.count
    busy = count[stage]
    if cfg.run.mode == "async":
        busy += max(count["teachers"], count["learner"]) if stage == "rollout" else count["rollout"]
    return max(1, cores // max(busy, 1))


def use_cpu_threads(cfg: Config, stage: str, on_gpu: bool) -> int:
    """Set this actor's torch threads (call first in its constructor, before an engine starts); returns them."""
    import torch

    if not on_gpu:
        threads = stage_threads(cfg, stage, len(os.sched_getaffinity(0)))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it later
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpus_needed(cfg: Config) -> float:
    return sum(d.count * d.cpus for d in demands(cfg))


def init_ray(cfg: Config) -> None:
    """Join the cluster named by run.ray_address or RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local head on loopback here
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # Logical CPUs are ours to choose on a local cluster: the tiny default oversubscribes the cores on purpose.
    num_cpus = max(os.cpu_count() or 1, int(cpus_needed(cfg) + 0.999))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=env)
    log.info("started a local Ray cluster on loopback with %d logical CPUs", num_cpus)


def check_ray_resources(cfg: Config) -> None:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_cluster_resources(cfg, ray.cluster_resources(), nodes)
