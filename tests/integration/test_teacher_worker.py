"""Teacher workers as Ray actors return what the in-process scoring function returns, for every payload."""

from __future__ import annotations

import hashlib

import pytest
import torch

from vigos_ray.config import load_config
from vigos_ray.data import PromptStream, read_records
from vigos_ray.easyvqa import write_easyvqa_jsonl
from vigos_ray.models import ModelFolderError, load_model, load_processor
from vigos_ray.objective import plan_batch
from vigos_ray.prompts import encode, student_text
from vigos_ray.sampling import make_rollout
from vigos_ray.scoring import output_head, teacher_targets
from vigos_ray.spans import parse_completion
from workers.group import WorkerGroup
from workers.teacher import TeacherWorker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plan_rows(tiny_fast, tmp_path_factory):
    cfg = load_config(overrides=["model.max_pixels=12544", "loss.objective=opsd"])
    processor = load_processor(tiny_fast, cfg.model.min_pixels, cfg.model.max_pixels)
    path = write_easyvqa_jsonl(tmp_path_factory.mktemp("data"), "test")
    samples = PromptStream(read_records(path)[:16], seed=1, max_pixels=12544).next_batch(3)
    rollouts, spans = [], []
    for s in samples:
        prompt = encode(processor, student_text(processor, s.problem, cfg.prompts), s.image).input_ids
        text = f"It shows {s.answer}.</description><think>So.</think>\\boxed{{{s.answer}}}<|im_end|>"
        completion = processor.tokenizer(text, add_special_tokens=False).input_ids
        rollouts.append(make_rollout(s.id, prompt, completion, [0.0] * len(completion), processor.tokenizer, 0))
        spans.append(parse_completion(completion, processor.tokenizer))
    plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
    return plan.teacher_rows["privileged"]


PAYLOADS = ["hidden", "topk", "sampled"]


def payload_config(payload: str):
    extra = ["loss.divergence=sampled_rkl"] if payload == "sampled" else []
    return load_config(overrides=["model.max_pixels=12544", f"scoring.payload={payload}", *extra])


@pytest.fixture(scope="module")
def pools(ray_cluster, tiny_fast):
    """One teacher actor per payload, all started at once (their start-up, mostly imports, overlaps)."""
    started = {p: WorkerGroup(TeacherWorker, n=1, num_cpus=1, num_gpus=0,
                              args=(payload_config(p), str(tiny_fast), "reference"), name=f"teacher-{p}", wait=False)
               for p in PAYLOADS}  # fmt: skip
    yield started
    for pool in started.values():
        pool.shutdown()


@pytest.mark.e2e  # three teacher actors (~15 s); the default suite's pipeline scores through teacher actors too
@pytest.mark.parametrize("payload", PAYLOADS)
def test_teacher_actor_scores_like_the_library_function(pools, tiny_fast, plan_rows, payload):
    cfg, pool = payload_config(payload), pools[payload]
    pool.ready().result()
    remote = pool.call_all("score", plan_rows)[0]
    checksum = pool.call_all("head_checksum")[0]
    model = load_model(tiny_fast)
    vocab = len(load_processor(tiny_fast, 3136, 12544).tokenizer)
    local = teacher_targets(model, plan_rows, payload, vocab, cfg.teachers["reference"].token_budget, cfg.scoring.topk,
                            pad_id=0)  # fmt: skip
    for a, b in zip(remote, local, strict=True):
        assert a.payload == b.payload == payload and len(a) == len(b) > 0
        for name in ("hidden", "topk_logprobs", "tail_logprob", "token_logprobs"):
            if getattr(b, name) is not None:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)
    assert checksum == hashlib.sha256(output_head(model).detach().numpy().tobytes()).hexdigest()


def test_a_missing_teacher_checkpoint_names_its_key(tiny_fast, tmp_path):
    cfg = load_config(overrides=[f"teachers.perception.checkpoint={tmp_path / 'nope'}"])
    with pytest.raises(ModelFolderError, match="teachers.perception.checkpoint"):
        TeacherWorker(cfg, tiny_fast, "perception")
