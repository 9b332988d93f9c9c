"""One learner rank in this process (a gloo group of 1) with LoRA and activation checkpointing: every adapter
trains, and the exported merged model computes what the learner computes."""

from __future__ import annotations

import pytest
import torch

from vigos_ray.batching import split_batch
from vigos_ray.config import load_config
from vigos_ray.models import load_model, load_processor, next_token_logprobs
from vigos_ray.step import frozen_copy, score_plan
from vigos_ray.weight_sync import free_port

from .test_algorithm import planned

pytestmark = pytest.mark.integration


@pytest.fixture
def lora_learner(tiny_fast):
    from workers.learner import LearnerWorker

    cfg = load_config(overrides=[
        f"model.path={tiny_fast}", "model.max_pixels=12544", "learner.workers=1", "learner.lora.enabled=true",
        "learner.lora.r=4", "learner.lora.alpha=8", "learner.lora.dropout=0.0", "learner.gradient_checkpointing=true",
        "learner.lr=1e-2", "learner.schedule=constant", "loss.chunk_tokens=16",
    ])  # fmt: skip
    learner = LearnerWorker(cfg, tiny_fast)
    learner.join("127.0.0.1", free_port("127.0.0.1"), 1)
    yield cfg, learner
    learner.shutdown()


def test_lora_with_checkpointing_trains_every_adapter_and_the_export_computes_the_same(
    lora_learner, tiny_fast, tmp_path
):
    cfg, learner = lora_learner
    processor = load_processor(tiny_fast, 3136, 12544)
    from vigos_ray.data import PromptStream, read_records
    from vigos_ray.easyvqa import write_easyvqa_jsonl

    samples = PromptStream(read_records(write_easyvqa_jsonl(tmp_path, "test"))[:16], seed=0, max_pixels=12544)
    rollouts, spans, plan = planned(samples.next_batch(4), processor, cfg)
    teacher = frozen_copy(load_model(tiny_fast))
    tok = processor.tokenizer
    targets = score_plan(dict.fromkeys(("perception", "reasoning", "reference"), teacher), plan, cfg, len(tok),
                         tok.pad_token_id)  # fmt: skip
    batch = split_batch(plan, targets, 1, cfg.learner.micro_token_budget)[0]
    for _ in range(2):  # peft starts lora_B at zero, so lora_A first gets a gradient in the second step
        stats = learner.train_step(batch)
    assert stats.version == 2 and stats.grad_norm > 0

    adapters = {n: p for n, p in learner.module.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)  # only adapters train
    no_grad = [n for n, p in adapters.items() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not no_grad, no_grad[:5]  # checkpointing (non-reentrant) loses no adapter, vision tower included
    assert any(".visual." in n for n in adapters)

    from workers.learner import token_logprobs

    ids = list(range(20, 60))
    export = load_model(learner.export(str(tmp_path / "export")))
    with torch.no_grad():
        exported = next_token_logprobs(export, torch.tensor([ids]))
        before = next_token_logprobs(load_model(tiny_fast), torch.tensor([ids]))
    torch.testing.assert_close(exported, torch.tensor(token_logprobs(learner, ids)), rtol=0, atol=1e-5)
    assert float((before - exported).abs().max()) > 1e-3


def test_one_bfloat16_rank_holds_frozen_weights_once_and_trains_as_the_plain_model(tiny_fast, tmp_path):
    """One rank keeps frozen weights out of FSDP (only copies to gain there), held once in `model.dtype`; the
    adapters stay FSDP's (fp32 master, cast for compute). Its first step's loss is the plain bf16 model's (LoRA's
    B starts at zero), and the step moves only the adapters."""
    from vigos_ray.data import PromptStream, read_records
    from vigos_ray.easyvqa import write_easyvqa_jsonl
    from vigos_ray.objective import student_loss
    from vigos_ray.scoring import output_head
    from workers.learner import LearnerWorker

    cfg = load_config(overrides=[
        f"model.path={tiny_fast}", "model.max_pixels=12544", "model.dtype=bfloat16", "learner.workers=1",
        "learner.lora.enabled=true", "learner.lora.r=4", "learner.lora.alpha=8", "learner.lora.dropout=0.0",
    ])  # fmt: skip
    learner = LearnerWorker(cfg, tiny_fast)
    learner.join("127.0.0.1", free_port("127.0.0.1"), 1)
    try:
        params = dict(learner.module.named_parameters())
        frozen = {n: p for n, p in params.items() if not p.requires_grad}
        assert frozen and all(type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16 for p in frozen.values())
        assert all(hasattr(p, "to_local") and p.dtype == torch.float32 for p in params.values() if p.requires_grad)
        before = {n: p.detach().clone() for n, p in frozen.items()}

        processor = load_processor(tiny_fast, 3136, 12544)
        samples = PromptStream(read_records(write_easyvqa_jsonl(tmp_path, "test"))[:16], seed=0, max_pixels=12544)
        _, _, plan = planned(samples.next_batch(4), processor, cfg)
        tok = processor.tokenizer
        teacher = frozen_copy(load_model(tiny_fast, "bfloat16"))
        targets = score_plan(dict.fromkeys(("perception", "reasoning", "reference"), teacher), plan, cfg, len(tok),
                             tok.pad_token_id)  # fmt: skip
        stats = learner.train_step(split_batch(plan, targets, 1, cfg.learner.micro_token_budget)[0])

        student = load_model(tiny_fast, "bfloat16").train()
        heads = {s.name: output_head(student).detach() for s in plan.segments}
        with torch.no_grad():
            loss, _ = student_loss(student, plan, targets, cfg, len(tok), heads, pad_id=tok.pad_token_id)
        assert stats.loss == float(loss) > 0  # exactly: no input of the model cast ahead of it (the rotary tables)
        assert stats.grad_norm > 0 and all(torch.equal(p.detach(), before[n]) for n, p in frozen.items())
    finally:
        learner.shutdown()
