"""Shared fixtures: tiny model folders built once per session, one local Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vigos-cache")


@pytest.fixture(scope="session")
def tiny_fast(cache_dir) -> Path:
    from vigos_ray.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir, "fast")


@pytest.fixture(scope="session")
def tiny_qwen_vocab(cache_dir) -> Path:
    from vigos_ray.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir, "qwen_vocab")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster on loopback for the whole session (ray.init costs 5-15 s here)."""
    import ray

    ray.init(
        num_cpus=8,  # logical CPUs: actors of the tiny model oversubscribe the 2 cores on purpose
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_warm(cache_dir) -> Path:
    """The default student: the tiny model's warm start, built once into the session's cache as `make run` does."""
    from vigos_ray.config import load_config
    from vigos_ray.sft import initial_model

    return initial_model(load_config(overrides=[f"run.cache_dir={cache_dir}"]))
