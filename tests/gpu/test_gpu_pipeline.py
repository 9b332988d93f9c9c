"""On a GPU (`-m gpu`, run by `make gpu-check`): the pipeline with every actor sharing one device, its learner in
NCCL and bf16 compute, keeps the rollout engine's weights equal to the learner's: after the initial push and after
a trained step, the engine's log-probs of a probe equal the learner's."""

from __future__ import annotations

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.driver import prompt_stream
from vigos_ray.models import load_processor
from vigos_ray.pipeline import Pipeline

from ..integration.test_algorithm import planned

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROBE = list(range(20, 70))
PROBE_TOL = 2e-3  # vLLM's GPU kernels against transformers' on the same fp32 weights (tiny model)


def probe_gap(pipe: Pipeline) -> float:
    learner = torch.tensor(pipe.learner.call_all("token_logprobs", PROBE)[0])
    return max(float((torch.tensor(lp) - learner).abs().max()) for lp in pipe.rollout.call_all("token_logprobs", PROBE))


def test_one_gpu_pipeline_pushes_weights_the_engine_computes_with(ray_cluster, tiny_fast, cache_dir):
    cfg = load_config(overrides=[
        f"model.path={tiny_fast}", f"run.cache_dir={cache_dir}", "model.max_pixels=12544", "data.limit=64",
        "rollout.num_gpus=0.3", "rollout.gpu_memory_utilization=0.2", "teachers.perception.num_gpus=0.1",
        "teachers.reasoning.num_gpus=0.1", "teachers.reference.num_gpus=0.1", "learner.workers=1",
        "learner.num_gpus=0.3", "learner.prompts_per_step=4", "learner.lr=1e-3", "rollout.max_new_tokens=24",
    ])  # fmt: skip
    pipe = Pipeline(cfg, tiny_fast)
    try:
        assert probe_gap(pipe) < PROBE_TOL
        processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
        _, _, plan = planned(prompt_stream(cfg, processor).next_batch(4), processor, cfg)
        targets, _ = pipe.score(plan)
        pipe.train(plan, targets)
        pipe.push_weights()
        assert pipe.version == 1 and probe_gap(pipe) < PROBE_TOL
    finally:
        pipe.shutdown()
