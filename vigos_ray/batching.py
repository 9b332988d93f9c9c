"""How one step's scored batch is cut across learner ranks and, within a rank, into micro-batches by tokens.

Every FSDP rank must run the same number of forward/backward passes (each pass all-gathers parameters), so ranks
with less work get their biggest micro-batch split, or, when a rank has a single rollout, a zero-weight repeat of
it. Token counts per segment are taken over the whole batch, so each rank's pooled loss is its share of the
global mean (SPEC §6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vigos_ray.objective import BatchPlan
from vigos_ray.scoring import pack_by_tokens
from vigos_ray.types import TeacherTargets


@dataclass
class MicroBatch:
    plan: BatchPlan
    targets: dict[str, list[TeacherTargets]]
    weight: float = 1.0  # 0.0: a repeat that only keeps this rank's passes in step with the other ranks
    rollouts: tuple[int, ...] = ()  # indices into the step's rollouts


@dataclass
class TrainBatch:
    """One learner rank's work for one optimizer step."""

    micro: list[MicroBatch]
    global_counts: dict[str, int]  # supervised tokens per segment over all ranks
    world_size: int


def select(plan: BatchPlan, targets: Mapping[str, Sequence[TeacherTargets]], keep: Sequence[int]):
    """The sub-plan (and its teacher targets) holding rollouts `keep`, renumbered 0..len(keep)-1 in that order:
    what the learner reads. The teachers' rows (their contexts, each with its own copy of the image's pixels) stay
    behind: the learner needs only which rollout each target belongs to."""
    new_index = {old: new for new, old in enumerate(keep)}
    sub = BatchPlan(plan.segments, positions={name: [p[i] for i in keep] for name, p in plan.positions.items()})
    sub_targets: dict[str, list[TeacherTargets]] = {}
    for seg in plan.segments:
        rows = plan.row_rollout.get(seg.name, [])
        picked = sorted((new_index[i], k) for k, i in enumerate(rows) if i in new_index)
        if picked:
            sub.row_rollout[seg.name] = [new for new, _ in picked]
            sub_targets[seg.name] = [targets[seg.name][k] for _, k in picked]
    sub.student_rows = [plan.student_rows[i] for i in keep]
    sub.completion_ids = [plan.completion_ids[i] for i in keep]
    sub.union = [plan.union[i] for i in keep]
    return sub, sub_targets


def assign_ranks(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Rollouts to ranks, largest first onto the least loaded rank (each rank's list in ascending order)."""
    if len(costs) < world_size:
        raise ValueError(
            f"{len(costs)} rollouts cannot feed {world_size} learner ranks; raise learner.prompts_per_step "
            "or rollout.samples_per_prompt, or lower learner.workers"
        )
    load = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], len(ranks[r]), r))
        ranks[r].append(i)
        load[r] += costs[i]
    return [sorted(r) for r in ranks]


def _micro_groups(rollouts: list[int], costs: Sequence[int], budget: int, count: int) -> list[tuple[list[int], float]]:
    """`count` micro-batches over `rollouts`: packed by budget, then the largest split, then zero-weight repeats."""
    groups = [sorted(rollouts[j] for j in g) for g in pack_by_tokens([costs[i] for i in rollouts], budget)]
    while len(groups) < count and any(len(g) > 1 for g in groups):
        g = max((g for g in groups if len(g) > 1), key=lambda g: sum(costs[i] for i in g))
        groups.remove(g)
        groups += [g[: len(g) // 2], g[len(g) // 2 :]]
    out = [(g, 1.0) for g in sorted(groups)]
    out += [(out[0][0][:1], 0.0)] * (count - len(out))
    return out


def split_batch(
    plan: BatchPlan,
    targets: Mapping[str, Sequence[TeacherTargets]],
    world_size: int,
    micro_token_budget: int,
) -> list[TrainBatch]:
    """One TrainBatch per rank; every rank gets the same number of micro-batches."""
    costs = [len(row.input_ids) for row in plan.student_rows]
    ranks = assign_ranks(costs, world_size)
    count = max(len(pack_by_tokens([costs[i] for i in r], micro_token_budget)) for r in ranks)
    counts = plan.counts()
    batches = []
    for rollouts in ranks:
        micro = []
        for group, weight in _micro_groups(rollouts, costs, micro_token_budget, count):
            sub, sub_targets = select(plan, targets, group)
            micro.append(MicroBatch(sub, sub_targets, weight, tuple(group)))
        batches.append(TrainBatch(micro, counts, world_size))
    return batches
