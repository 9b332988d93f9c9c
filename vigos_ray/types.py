"""Frozen payloads that cross actor boundaries. Shapes and meanings are in the field comments."""

from __future__ import annotations

from dataclasses import dataclass


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
