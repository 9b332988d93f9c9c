"""On GPUs (`-m gpu`, run by `make gpu-check`): the pipeline keeps the rollout engine's weights equal to the
learner's over every weight-push transport: after the initial push and after a trained step, the engine's
log-probs of a probe equal the learner's. One GPU: every actor shares it (ipc, and gloo through host memory); two
or three: the engine on GPUs of its own (nccl, with tensor parallelism on three)."""

from __future__ import annotations

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.models import load_processor
from vigos_ray.preflight import prompt_stream
from workers.learner import token_logprobs
from workers.pipeline import Pipeline

from ..integration.test_algorithm import planned

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROBE = list(range(20, 70))
PROBE_TOL = 2e-3  # vLLM's GPU kernels against transformers' on the same fp32 weights (tiny model)


def probe_gap(pipe: Pipeline) -> float:
    learner = torch.tensor(pipe.learner.call_all(token_logprobs, PROBE)[0])
    return max(float((torch.tensor(lp) - learner).abs().max()) for lp in pipe.rollout.call_all("token_logprobs", PROBE))


ONE_GPU = [
    "rollout.num_gpus=0.3",
    "rollout.gpu_memory_utilization=0.2",
    "teachers.perception.num_gpus=0.1",
    "teachers.reasoning.num_gpus=0.1",
    "teachers.reference.num_gpus=0.1",
    "learner.num_gpus=0.3",
]
# learner rank 0 on one GPU, each engine worker on a GPU of its own, teachers on CPU
APART = ["learner.num_gpus=1", "rollout.gpu_memory_utilization=0.3"]


@pytest.mark.parametrize(
    "transport, expected, placement, gpus",
    [
        ("auto", "ipc", ONE_GPU, 1),  # the engine shares learner rank 0's GPU: CUDA IPC
        ("gloo", "gloo", ONE_GPU, 1),  # through host memory, as on CPU
        ("auto", "nccl", [*APART, "rollout.num_gpus=1"], 2),
        ("nccl", "nccl", [*APART, "rollout.num_gpus=2", "rollout.tensor_parallel_size=2"], 3),
    ],
    ids=["ipc-one-gpu", "gloo-one-gpu", "nccl-two-gpus", "nccl-tensor-parallel"],
)
def test_every_transport_pushes_weights_the_engine_computes_with(
    ray_cluster, tiny_fast, cache_dir, transport, expected, placement, gpus
):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    cfg = load_config(overrides=[
        f"model.path={tiny_fast}", f"run.cache_dir={cache_dir}", "model.max_pixels=12544", "data.limit=64",
        "learner.workers=1", "learner.prompts_per_step=4", "learner.lr=1e-3", "rollout.max_new_tokens=24",
        f"weight_sync.transport={transport}", "weight_sync.bucket_mb=1", *placement,
    ])  # fmt: skip
    pipe = Pipeline(cfg, tiny_fast)
    try:
        assert pipe.pusher.transport == expected
        assert probe_gap(pipe) < PROBE_TOL
        processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
        _, _, plan = planned(prompt_stream(cfg, processor).next_batch(4), processor, cfg)
        targets, _ = pipe.score(plan)
        pipe.train(plan, targets)
        report, receipts = pipe.push_weights()
        assert pipe.version == 1 and probe_gap(pipe) < PROBE_TOL
        assert report.transport == expected and all(r.matches(report) for r in receipts)
    finally:
        pipe.shutdown()
