"""Learning-rate schedules as factors of the peak rate per optimizer step (torch's LambdaLR): one definition for
the learner (`learner.schedule`) and the supervised warm start (cosine)."""

from __future__ import annotations

import math


def lr_lambda(schedule: str, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then `schedule` (linear or cosine decay to 0 at `total`, or constant)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor
