"""Which teacher scores which tokens of a rollout, in which context, with which divergence (SPEC §5, §6).

An objective is a tuple of segments, each saying which teacher pool scores it, in which context, which completion
positions it supervises, with which divergence and weight; objectives are registered by name (`@objective`), so a
new one is one function, anywhere (tests/integration/test_algorithm.py defines one in the test). `plan_batch`
turns rollouts and their spans into the rows each teacher must score and the one student row per rollout;
`student_loss` computes the weighted sum of pooled segment means from the student's hidden states and the
teachers' targets. The single-process step and the distributed learner both go through these two functions, so
they compute the same loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from vigos_ray.config import Config, ConfigError, ContextConfig, LossConfig
from vigos_ray.data import Sample
from vigos_ray.losses import DivergenceKind, DivergenceSpec, pooled_mean, token_losses
from vigos_ray.prompts import EncodedContext, context_text, encode
from vigos_ray.scoring import concat_targets, hidden_at
from vigos_ray.types import Rollout, ScoreRow, Spans, TeacherTargets


@dataclass(frozen=True)
class Segment:
    name: str  # in metrics and plots: perception | reasoning | reference (vigos); privileged (opsd); external
    teacher: str  # the teacher role whose pool scores it: a key of `teachers`
    context: str  # the context that teacher reads: a key of `prompts`
    kind: DivergenceKind
    weight: float
    scores: str = "completion"  # the completion positions it supervises: a key of SCORED


# Completion positions a segment can supervise, from a rollout's spans (SPEC §4).
SCORED: dict[str, Callable[[Spans], tuple[int, ...]]] = {
    "description": lambda spans: spans.description,
    "reasoning": lambda spans: spans.reasoning,
    "reference": lambda spans: spans.reference,  # empty for valid rows: the reference teacher sees invalid rows only
    "completion": lambda spans: tuple(range(spans.length)),  # every completion token, EOS included
}
OBJECTIVES: dict[str, Callable[[LossConfig], tuple[Segment, ...]]] = {}


def objective(name: str):
    """Register a function `LossConfig -> segments` as `loss.objective=<name>`."""

    def register(fn):
        OBJECTIVES[name] = fn
        return fn

    return register


@objective("vigos")
def vigos(cfg: LossConfig) -> tuple[Segment, ...]:
    """Three teachers: image-only perception on the description, answer-aware reasoning on the reasoning and
    answer, and the full-format reference teacher on rollouts whose format is broken."""
    return (
        Segment("perception", "perception", "perception", "forward", cfg.perception_weight, scores="description"),
        Segment("reasoning", "reasoning", "reasoning", "forward", cfg.reasoning_weight, scores="reasoning"),
        Segment("reference", "reference", "reference", "reverse", cfg.reference_weight, scores="reference"),
    )


@objective("opsd")
def opsd(cfg: LossConfig) -> tuple[Segment, ...]:
    """The privileged full-format teacher (the reference context: image, question and answer) on every token."""
    return (Segment("privileged", "privileged", "reference", "forward", 1.0),)


@objective("distill")
def distill(cfg: LossConfig) -> tuple[Segment, ...]:
    """An external teacher (`teachers.external.checkpoint`) reading the student's own context on every token."""
    return (Segment("external", "external", "student", "reverse", 1.0),)


def segments(cfg: LossConfig) -> tuple[Segment, ...]:
    """The objective's segments. `loss.divergence=kl` keeps each segment's own direction (SPEC §5); `jsd` and
    `sampled_rkl` replace it for every segment."""
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"config key 'loss.objective': unknown objective {cfg.objective!r}; registered: "
                          f"{sorted(OBJECTIVES)}")  # fmt: skip
    base = OBJECTIVES[cfg.objective](cfg)
    override = {"kl": None, "jsd": "jsd", "sampled_rkl": "sampled"}[cfg.divergence]
    if override is None:
        return base
    return tuple(dataclasses.replace(s, kind=override) for s in base)


def divergence_spec(segment: Segment, cfg: LossConfig) -> DivergenceSpec:
    return DivergenceSpec(segment.kind, cfg.jsd_beta, cfg.temperature, cfg.clip_mode, cfg.clip)


def segment_positions(segment: Segment, spans: Spans) -> tuple[int, ...]:
    """Completion positions the segment supervises in one rollout (SPEC §4)."""
    return SCORED[segment.scores](spans)


def _continuation(context: ContextConfig, spans: Spans, positions: tuple[int, ...]) -> tuple[int, int]:
    """The completion slice [start, stop) that follows a teacher's context: from where the context resumes to the
    last position scored (a causal model's scores at those positions depend on nothing later)."""
    start = spans.think_start if context.resumes == "think" else 0
    return start, max(positions) + 1


@dataclass
class BatchPlan:
    """Everything the teachers and the learner need for one batch of rollouts.

    teacher_rows[segment] lists the rows to score, and row_rollout[segment] the rollout index of each; positions
    [segment][i] are the supervised completion positions of rollout i; student_rows[i] scores, for rollout i, the
    sorted union of its positions over all segments, which union[i] lists.
    """

    segments: tuple[Segment, ...]
    positions: dict[str, list[tuple[int, ...]]]
    teacher_rows: dict[str, list[ScoreRow]] = field(default_factory=dict)
    row_rollout: dict[str, list[int]] = field(default_factory=dict)
    student_rows: list[ScoreRow] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    union: list[list[int]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: sum(len(p) for p in per_rollout) for name, per_rollout in self.positions.items()}


def _row(context: EncodedContext, completion: list[int], start: int, stop: int, positions) -> ScoreRow:
    n = len(context.input_ids)
    return ScoreRow(
        input_ids=context.input_ids + completion[start:stop],
        pixel_values=context.pixel_values,
        image_grid_thw=context.image_grid_thw,
        scored=tuple(n + t - start for t in positions),
    )


class ContextCache:
    """Each (sample, context) encoded once: image processing and tokenization are the costly part of planning."""

    def __init__(self, processor, cfg: Config):
        self.processor, self.cfg = processor, cfg
        self._cache: dict[tuple[str, str, int], EncodedContext] = {}

    def get(self, sample: Sample, name: str, trim: int = 0) -> EncodedContext:
        """The encoded context `name` of `sample`, with its last `trim` characters (part of a tag) left out."""
        key = (sample.id, name, trim)
        if key not in self._cache:
            text = context_text(self.processor, self.cfg.context(name), sample.problem, sample.answer)
            self._cache[key] = encode(self.processor, text[: len(text) - trim], sample.image)
        return self._cache[key]


def teacher_row(contexts: ContextCache, segment: Segment, sample: Sample, completion: list[int], spans: Spans):
    """The row `segment`'s teacher scores for one rollout, or None when the segment has no token in it."""
    positions = segment_positions(segment, spans)
    if not positions:
        return None
    ctx = contexts.cfg.context(segment.context)
    start, stop = _continuation(ctx, spans, positions)
    context = contexts.get(sample, segment.context, trim=spans.think_overlap if ctx.resumes == "think" else 0)
    return _row(context, completion, start, stop, positions)


def plan_batch(
    processor, samples: Mapping[str, Sample], rollouts: Sequence[Rollout], spans: Sequence[Spans], cfg: Config
) -> BatchPlan:
    """Rows for each teacher (only rollouts with tokens in its segment) and one student row per rollout."""
    segs = segments(cfg.loss)
    plan = BatchPlan(segs, positions={s.name: [segment_positions(s, sp) for sp in spans] for s in segs})
    contexts = ContextCache(processor, cfg)
    for i, (rollout, sp) in enumerate(zip(rollouts, spans, strict=True)):
        sample = samples[rollout.sample_id]
        completion = list(rollout.completion_ids)
        plan.completion_ids.append(completion)
        student = contexts.get(sample, "student")
        if student.input_ids != list(rollout.prompt_ids):
            raise ValueError(
                f"rollout of {rollout.sample_id} was sampled from a different student context than "
                "prompts.student renders now; were the templates or the processor changed mid-run?"
            )
        for seg in segs:
            row = teacher_row(contexts, seg, sample, completion, sp)
            if row is not None:
                plan.teacher_rows.setdefault(seg.name, []).append(row)
                plan.row_rollout.setdefault(seg.name, []).append(i)
        union = sorted({t for seg in segs for t in plan.positions[seg.name][i]})
        plan.union.append(union)
        plan.student_rows.append(_row(student, completion, 0, (union[-1] + 1) if union else 0, union))
    return plan


@dataclass(frozen=True)
class SegmentStats:
    loss: float  # this rank's pooled share (the term before its weight)
    divergence: float  # mean unclipped divergence over this rank's tokens
    clipped: float  # fraction of this rank's tokens whose divergence exceeded loss.clip
    tokens: int  # this rank's tokens


def student_loss(
    student,
    plan: BatchPlan,
    targets: Mapping[str, Sequence[TeacherTargets]],
    cfg: Config,
    vocab_size: int,
    teacher_heads: Mapping[str, torch.Tensor] | None = None,
    global_counts: Mapping[str, int] | None = None,
    world_size: int = 1,
    pad_id: int = 0,
) -> tuple[torch.Tensor, dict[str, SegmentStats]]:
    """Weighted sum of the pooled segment losses for this rank's rollouts (differentiable), and per-segment stats.

    targets[segment] lines up with plan.teacher_rows[segment]; teacher_heads[segment] is that teacher's frozen
    output head (hidden payloads); global_counts are the segment token counts over all ranks (default: this rank's).
    """
    counts = plan.counts()
    global_counts = dict(global_counts) if global_counts is not None else counts
    head = student.get_output_embeddings().weight
    hidden = hidden_at(student, plan.student_rows, cfg.learner.micro_token_budget, pad_id)
    # Zero times every hidden state: a rank whose rows supervise nothing still joins the backward (FSDP needs it).
    total = head.new_zeros((), dtype=torch.float32) + 0.0 * sum(h.sum() for h in hidden)
    stats: dict[str, SegmentStats] = {}
    where = [{t: k for k, t in enumerate(union)} for union in plan.union]  # completion position -> hidden row
    for seg in plan.segments:
        rows = plan.row_rollout.get(seg.name, [])
        if not rows:
            stats[seg.name] = SegmentStats(0.0, 0.0, 0.0, 0)
            continue
        h_s, target_ids = [], []
        for i in rows:
            pos = plan.positions[seg.name][i]
            h_s.append(hidden[i][[where[i][t] for t in pos]])
            target_ids.extend(plan.completion_ids[i][t] for t in pos)
        teacher = concat_targets(targets[seg.name])
        token_loss, divergence = token_losses(
            torch.cat(h_s), head, teacher, torch.tensor(target_ids, device=head.device), divergence_spec(seg, cfg.loss),
            vocab_size, (teacher_heads or {}).get(seg.name), cfg.loss.chunk_tokens,
        )  # fmt: skip
        term = pooled_mean(token_loss, global_counts[seg.name], world_size)
        total = total + seg.weight * term
        stats[seg.name] = SegmentStats(
            loss=float(term.detach()),
            divergence=float(divergence.mean()),
            clipped=float((divergence > cfg.loss.clip).float().mean()) if cfg.loss.clip_mode != "none" else 0.0,
            tokens=int(divergence.numel()),
        )
    return total, stats
