"""Weight pushes through vLLM's weight-transfer lifecycle at the shapes a GPU cluster runs: several rollout
workers, each an engine with tensor parallelism (its engine workers in processes of their own, each a member of
the push group under its own rank), and a learner of 3 FSDP ranks. After every push of a sync and an async run,
every rollout worker computes the learner's log-probs on a probe; a corrupted bucket is refused by the engine and
leaves it stale until a verified push lands."""

from __future__ import annotations

import dataclasses

import pytest

from vigos_ray.models import load_processor
from vigos_ray.preflight import prompt_stream
from vigos_ray.weight_sync import WeightSyncError
from workers.driver import train
from workers.pipeline import Pipeline
from workers.rollout import StaleWeightsError

from .test_pipeline import config, probe_gaps

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
# A tensor-parallel engine splits each matmul's reduction across its ranks: the same weights, other summation
# orders. Measured here (fp32, tiny model): at most 4.8e-7 over the 4 pushes; 1e-5 as for a single engine.
TP_PROBE_TOL = 1e-5


def test_two_tensor_parallel_engines_and_three_learner_ranks_hold_the_learners_weights_after_every_push(
    ray_cluster, tiny_fast, cache_dir
):
    cfg = config(tiny_fast, cache_dir, "learner.workers=3", "learner.prompts_per_step=3", "rollout.workers=2",
                 "rollout.tensor_parallel_size=2", "run.steps=2", "weight_sync.bucket_mb=1")  # fmt: skip
    processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
    pipe = Pipeline(cfg, tiny_fast)
    try:
        assert pipe.pusher.transport == "gloo"
        receipts, gaps = [], []
        push = pipe.push_weights

        def spy(*args, **kwargs):
            report, got = push(*args, **kwargs)
            receipts.append((report, got))
            return report, got

        pipe.push_weights = spy
        for mode in ("sync", "async"):
            run = dataclasses.replace(cfg.run, mode=mode, steps=2)
            train(dataclasses.replace(cfg, run=run), pipe, processor, prompt_stream(cfg, processor),
                  lambda record: gaps.append(probe_gaps(pipe)))  # fmt: skip
        assert len(gaps) == 4 and all(len(g) == 2 for g in gaps)
        assert max(max(g) for g in gaps) < TP_PROBE_TOL, gaps
        assert receipts and all(
            len(got) == 2 and all(r.engine_workers == 2 and r.matches(report) for r in got) for report, got in receipts
        )

        # A damaged bucket: both engine workers of rollout worker 1 refuse it (nothing of it loaded), the push
        # fails loudly, and the worker stays stale (refuses to sample) until a verified push lands.
        def damage_third_message(engine_worker):  # in each engine worker: flip a bit of the next push's bucket 1
            transport = engine_worker.weight_transfer_engine.transport
            recv, count = transport.recv, [0]

            def damaged(nbytes):
                wait, k = recv(nbytes), count[0]
                count[0] += 1

                def received():
                    message = wait()
                    if k == 2:  # messages: bucket 0, its digest, bucket 1, ...
                        message[0] ^= 1
                    return message

                return received

            transport.recv = damaged

        worker = pipe.rollout.actors[1]
        ray_cluster.get(worker.__ray_call__.remote(lambda w: w._engine.collective_rpc(damage_third_message)))
        with pytest.raises(WeightSyncError, match="bucket 1 .* not loaded"):
            pipe.push_weights()
        with pytest.raises(StaleWeightsError):
            ray_cluster.get(worker.generate.remote(prompt_stream(cfg, processor).next_batch(1), 0))
        pipe.push_weights()  # the worker holds no verified lineage now: it is sent every tensor
        assert max(probe_gaps(pipe)) < TP_PROBE_TOL
    finally:
        pipe.shutdown()
