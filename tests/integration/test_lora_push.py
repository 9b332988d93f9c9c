"""Delta weight pushes with LoRA on the session's Ray cluster: after the first full push only the blocks LoRA
trains travel, the engine still computes what the learner computes after every push, and a worker without the
lineage refuses a delta and gets every tensor again. (A killed and restarted rollout worker gets every tensor
too: test_pipeline.py kills one.)"""

from __future__ import annotations

import pytest
import torch

from vigos_ray.models import load_processor
from vigos_ray.preflight import prompt_stream
from workers.driver import train
from workers.pipeline import Pipeline

from .test_pipeline import PROBE, PROBE_TOL, config, probe_gap

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_lora_pushes_carry_only_what_training_changes_and_a_worker_without_them_gets_everything(
    ray_cluster, tiny_fast, cache_dir, caplog
):
    cfg = config(tiny_fast, cache_dir, "learner.workers=1", "learner.lora.enabled=true", "learner.lora.r=8",
                 "loss.objective=opsd", "run.steps=2")  # fmt: skip
    processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
    pipe = Pipeline(cfg, tiny_fast)
    try:
        full = {s.name for s in pipe.pusher.specs}
        delta = {s.name for s in pipe.pusher.delta_specs}
        frozen = {n for n in full if "embed_tokens" in n or "lm_head" in n or n.startswith("model.visual.patch_embed")}
        assert frozen and not frozen & delta and delta < full
        assert {n for n in full if ".layers.0." in n} <= delta  # a trained block travels whole, norms included
        specs, delta_specs = pipe.pusher.specs, pipe.pusher.delta_specs
        nbytes = {"full": sum(s.nbytes for s in specs), "delta": sum(s.nbytes for s in delta_specs)}

        pushes, push_once = [], pipe.pusher._push_once

        def spy(*args, **kwargs):  # every push the pipeline makes, recovery pushes included
            report, receipts = push_once(*args, **kwargs)
            pushes.append((report.full, report.bytes, {r.state for r in receipts} == {report.state}))
            return report, receipts

        pipe.pusher._push_once = spy
        records, gaps = [], []

        def on_step(record):
            records.append(record)
            gaps.append(probe_gap(pipe))

        before = torch.tensor(pipe.rollout.call_all("token_logprobs", PROBE)[0])
        train(cfg, pipe, processor, prompt_stream(cfg, processor), on_step)

        # A worker that loaded other weights (an evaluation's folder; a restarted worker is the same) holds no
        # lineage: it refuses a delta, loading nothing, and the pipeline sends it every tensor instead.
        pipe.rollout.call_all("use_weights_from", str(tiny_fast))
        pipe.push_weights()
        assert "holds no full push to apply a delta to" in caplog.text and "pushing every tensor" in caplog.text
        assert probe_gap(pipe) < PROBE_TOL
        train(cfg, pipe, processor, prompt_stream(cfg, processor), on_step)
        after = torch.tensor(pipe.rollout.call_all("token_logprobs", PROBE)[0])
    finally:
        pipe.shutdown()

    delta, full = (False, nbytes["delta"]), (True, nbytes["full"])
    assert [(f, b) for f, b, _ in pushes] == [delta, delta, full, delta, delta], pushes
    assert all(same_state for _, _, same_state in pushes)
    assert [r["push/full"] for r in records] == [0] * 4 and all(r["push/bytes"] == nbytes["delta"] for r in records)
    assert max(gaps) < PROBE_TOL, gaps  # after every push, the fallback included, engine == learner
    assert float((after - before).abs().max()) > 100 * PROBE_TOL  # and the adapted weights did move
