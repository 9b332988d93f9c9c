"""One ViGOS training step in a single process: the reference the distributed pipeline must reproduce.

rollout (HF generate) -> parse spans -> teacher targets -> student loss -> backward. Teachers are frozen models
keyed by pool role (perception, reasoning, reference); for self-distillation all three are one frozen copy of the
initial weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vigos_ray.config import Config
from vigos_ray.data import Sample
from vigos_ray.models import sampling_token_ids
from vigos_ray.objective import BatchPlan, SegmentStats, plan_batch, student_loss
from vigos_ray.sampling import banned_rows, hf_rollouts
from vigos_ray.scoring import output_head, pool_targets
from vigos_ray.spans import TokenTable, parse_completion
from vigos_ray.types import Rollout, Spans, TeacherTargets


@dataclass
class StepResult:
    loss: float
    segments: dict[str, SegmentStats]
    rollouts: list[Rollout]
    spans: list[Spans]
    plan: BatchPlan
    targets: dict[str, list[TeacherTargets]]


def score_plan(teachers: Mapping[str, object], plan: BatchPlan, cfg: Config, vocab_size: int, pad_id: int):
    """Every segment's rows scored by its teacher, in the configured payload."""
    targets = {}
    for seg in plan.segments:
        rows = plan.teacher_rows.get(seg.name, [])
        targets[seg.name] = (
            pool_targets(teachers[seg.teacher], rows, cfg, seg.teacher, vocab_size, pad_id) if rows else []
        )
    return targets


def vigos_step(
    student,
    teachers: Mapping[str, object],
    processor,
    samples: Sequence[Sample],
    cfg: Config,
    seed: int = 0,
    rollouts: Sequence[Rollout] | None = None,
    times: dict[str, float] | None = None,
) -> StepResult:
    """Run one step on `student` and leave the gradient in its parameters (the caller steps the optimizer).
    `times`, if given, receives the seconds of each stage: sampling, plan, teachers, student (loss and backward)."""
    tokenizer = processor.tokenizer
    clock = _Clock(times)
    if rollouts is None:
        banned = banned_rows(student, sampling_token_ids(tokenizer))
        was_training = student.training
        student.eval()
        rollouts = hf_rollouts(student, processor, list(samples), cfg, seed, banned)
        student.train(was_training)
    clock("sampling")
    table = TokenTable.for_tokenizer(tokenizer)
    spans = [parse_completion(r.completion_ids, table, cfg.loss.span_convention) for r in rollouts]
    plan = plan_batch(processor, {s.id: s for s in samples}, rollouts, spans, cfg)
    clock("plan")
    pad_id = tokenizer.pad_token_id or 0
    targets = score_plan(teachers, plan, cfg, len(tokenizer), pad_id)
    clock("teachers")
    heads = {seg.name: output_head(teachers[seg.teacher]).detach() for seg in plan.segments}
    loss, stats = student_loss(student, plan, targets, cfg, len(tokenizer), heads, pad_id=pad_id)
    loss.backward()
    clock("student")
    return StepResult(float(loss.detach()), stats, list(rollouts), spans, plan, targets)


class _Clock:
    """Records the seconds since the previous mark under each stage's name (nothing when `times` is None)."""

    def __init__(self, times: dict[str, float] | None):
        self.times, self.last = times, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        if self.times is not None:
            self.times[stage] = now - self.last
        self.last = now


def frozen_copy(model):
    """A frozen teacher: a deep copy of `model` in eval mode with gradients off."""
    import copy

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
