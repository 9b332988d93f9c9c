"""Cutting a step's batch across learner ranks and micro-batches (no model: synthetic plans with marked targets)."""

from __future__ import annotations

import pytest
import torch

from vigos_ray.batching import assign_ranks, select, split_batch
from vigos_ray.config import LossConfig
from vigos_ray.objective import BatchPlan, segments
from vigos_ray.types import ScoreRow, TeacherTargets


def synthetic_plan(lengths: list[int], invalid: set[int]) -> tuple[BatchPlan, dict[str, list[TeacherTargets]]]:
    """Rollout i has a student row of lengths[i] tokens; valid rows supervise perception (2 tokens) and reasoning
    (3), invalid ones reference (4). Each teacher target carries its rollout index as its value."""
    segs = segments(LossConfig())
    pos = {"perception": (0, 1), "reasoning": (2, 3, 4), "reference": (0, 1, 2, 3)}
    plan = BatchPlan(segs, positions={s.name: [] for s in segs})
    targets: dict[str, list[TeacherTargets]] = {}
    for i, n in enumerate(lengths):
        for seg in segs:
            mine = pos[seg.name] if (seg.name == "reference") == (i in invalid) else ()
            plan.positions[seg.name].append(mine)
            if mine:
                plan.teacher_rows.setdefault(seg.name, []).append(ScoreRow([i] * n, None, None, mine))
                plan.row_rollout.setdefault(seg.name, []).append(i)
                marked = torch.full((len(mine),), float(i))
                targets.setdefault(seg.name, []).append(TeacherTargets("sampled", token_logprobs=marked))
        plan.student_rows.append(ScoreRow([i] * n, None, None, (1, 2, 3, 4)))
        plan.completion_ids.append([i] * 5)
        plan.union.append([0, 1, 2, 3, 4] if i not in invalid else [0, 1, 2, 3])
    return plan, targets


def test_select_keeps_each_rollouts_rows_and_targets_together():
    plan, targets = synthetic_plan([10, 20, 30, 40], invalid={1, 2})
    sub, sub_targets = select(plan, targets, [3, 1])
    assert [r.input_ids[0] for r in sub.student_rows] == [3, 1]
    assert sub.row_rollout == {"perception": [0], "reasoning": [0], "reference": [1]}
    assert [t.token_logprobs[0].item() for t in sub_targets["reference"]] == [1.0]
    assert [t.token_logprobs[0].item() for t in sub_targets["perception"]] == [3.0]
    assert sub.counts() == {"perception": 2, "reasoning": 3, "reference": 4}
    assert sub.teacher_rows == {}  # the learner never reads the teachers' contexts: they are not sent to it


def test_ranks_get_balanced_tokens_and_every_rollout_once():
    ranks = assign_ranks([100, 90, 10, 10, 10, 80], world_size=2)
    assert sorted(i for r in ranks for i in r) == list(range(6))
    loads = [sum([100, 90, 10, 10, 10, 80][i] for i in r) for r in ranks]
    assert sorted(loads) == [130, 170]  # the best split there is: no subset sums to 150
    with pytest.raises(ValueError, match="raise learner.prompts_per_step"):
        assign_ranks([5], world_size=2)


@pytest.mark.parametrize("lengths", [[50, 50, 50, 50, 50, 50], [400, 30, 30, 30, 30], [120, 10], [10, 10, 10, 300]])
def test_every_rank_runs_the_same_number_of_micro_batches_and_trains_each_rollout_once(lengths):
    plan, targets = synthetic_plan(lengths, invalid={0})
    batches = split_batch(plan, targets, world_size=2, micro_token_budget=100)
    assert len({len(b.micro) for b in batches}) == 1
    trained = sorted(i for b in batches for m in b.micro if m.weight == 1.0 for i in m.rollouts)
    assert trained == list(range(len(lengths)))
    for b in batches:
        assert b.global_counts == plan.counts() and b.world_size == 2
        for m in b.micro:
            assert m.weight in (0.0, 1.0)
            # a micro-batch stays within the token budget unless it holds a single longer rollout
            assert len(m.rollouts) == 1 or sum(lengths[i] for i in m.rollouts) <= 100
            for name, rows in m.plan.row_rollout.items():  # targets follow their rollouts
                values = [t.token_logprobs[0].item() for t in m.targets[name]]
                assert values == [float(m.rollouts[k]) for k in rows]
