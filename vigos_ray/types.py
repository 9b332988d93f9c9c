"""Frozen payloads that cross actor boundaries. Shapes and meanings are in the field comments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rollout:
    """One sampled student completion for one prompt."""

    sample_id: str
    prompt_ids: list[int]  # student context, image pads expanded, ending with the prefill
    completion_ids: list[int]  # sampled tokens, EOS included when the model stopped by itself
    logprobs: list[float]  # log p(y_t) of each sampled token under the sampling policy, temperature 1
    text: str  # decoded completion, for logs only: never re-tokenized
    version: int  # policy version of the weights that sampled it
    finish_reason: str  # "stop" (EOS) or "length" (cut at rollout.max_new_tokens)


@dataclass(frozen=True)
class Spans:
    """Where each ViGOS segment lies in one completion (indices into `Rollout.completion_ids`), SPEC §4."""

    valid: bool
    reason: str  # why the rollout is invalid; "" when valid
    length: int  # tokens up to and including the first EOS (the whole completion if it has none)
    description: tuple[int, ...] = ()  # T_d: scored by the perception teacher (valid rows)
    reasoning: tuple[int, ...] = ()  # T_ra: scored by the reasoning teacher (valid rows)
    reference: tuple[int, ...] = ()  # every token of an invalid row: scored by the reference teacher
    description_end: int = 0  # first token holding `</description>`: the perception context stops here
    think_start: int = 0  # first token holding reasoning bytes after `<think>`: the reasoning context resumes here
    think_overlap: int = 0  # bytes of `<think>` inside that token (`>The` holds 1): trimmed from the prefill
    answer_end: int = 0  # one past the token closing `\boxed{...}`
    answer: str | None = None  # the text inside the box


@dataclass(frozen=True)
class ScoreRow:
    """One sequence to teacher-force: a context, the completion tokens it continues with, the tokens to score.

    `scored[j]` indexes `input_ids`; the target is `input_ids[scored[j]]`, predicted at position `scored[j] - 1`.
    """

    input_ids: list[int]  # context (image pads expanded) followed by (a slice of) the completion
    pixel_values: Any  # torch.Tensor [patches, patch_dim] or None
    image_grid_thw: Any  # torch.Tensor [images, 3] or None
    scored: tuple[int, ...]


@dataclass(frozen=True)
class SegmentSums:
    """One learner rank's totals for one segment over a step's micro-batches (zero-weight repeats left out)."""

    loss: float  # this rank's share of the pooled segment loss
    divergence_sum: float  # per-token divergence summed over the rank's supervised tokens
    clipped_tokens: float  # tokens whose divergence exceeded loss.clip
    tokens: int


@dataclass(frozen=True)
class RankStep:
    """What one learner rank reports after an optimizer step."""

    rank: int
    loss: float  # this rank's share of the step's loss (the ranks' mean is the batch loss)
    segments: dict[str, SegmentSums]
    grad_norm: float  # of the whole model, before clipping (the same on every rank)
    lr: float  # the learning rate this step used
    version: int  # the policy version the step produced
    micro_batches: int  # forward/backward passes (equal on every rank)
    seconds: float


@dataclass(frozen=True)
class TeacherTargets:
    """What a teacher ships per scored token of one row (SPEC §7); only the fields of its payload are set.

    hidden:  `hidden` [n, d], final normalized hidden states (the learner applies the frozen initial head).
    topk:    `topk_ids` [n, k], `topk_logprobs` [n, k] (log q at temperature, normalized over the full
             vocabulary) and `tail_logprob` [n] = log of the mass outside the k ids.
    sampled: `token_logprobs` [n] = log q(y_t) at temperature.
    """

    TENSORS = ("hidden", "topk_ids", "topk_logprobs", "tail_logprob", "token_logprobs")  # (a class constant)

    payload: str
    hidden: Any = None
    topk_ids: Any = None
    topk_logprobs: Any = None
    tail_logprob: Any = None
    token_logprobs: Any = None

    def to(self, device) -> TeacherTargets:
        """The same targets with every tensor on `device` (teachers ship CPU tensors; the learner may be on GPU)."""
        moved = {n: getattr(self, n).to(device) for n in self.TENSORS if getattr(self, n) is not None}
        return TeacherTargets(self.payload, **moved)

    def __len__(self) -> int:
        for x in (self.hidden, self.topk_ids, self.token_logprobs):
            if x is not None:
                return int(x.shape[0])
        return 0


@dataclass(frozen=True)
class Decoding:
    """Sampling settings that replace the rollout workers' `rollout.*` ones for one call (held-out evaluation)."""

    temperature: float
    top_p: float
    top_k: int  # -1: off
    max_new_tokens: int
    samples_per_prompt: int

    def applied_to(self, rollout):
        """`rollout` (a RolloutConfig) with these fields replaced."""
        return dataclasses.replace(rollout, **dataclasses.asdict(self))
