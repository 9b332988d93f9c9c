"""Student sampling with Hugging Face `generate`: the reference path behind `rollout.backend=hf` and `vigos_step`.

Seeds depend on the sample and the completion index only, so a completion does not change with the batch it
landed in or the worker that drew it.
"""

from __future__ import annotations

import zlib

import torch

from vigos_ray.config import Config, RolloutConfig
from vigos_ray.data import Sample
from vigos_ray.prompts import EncodedContext, encode, student_text
from vigos_ray.spans import EOS_TOKENS
from vigos_ray.types import Rollout


def sample_seed(seed: int, sample_id: str, j: int) -> int:
    """Per-completion sampling seed: depends on the sample, not on which worker or batch slot it landed in."""
    return zlib.crc32(f"{seed}:{sample_id}:{j}".encode())


def banned_rows(model, allowed_ids: list[int]) -> list[int]:
    """Head rows the student may not sample: vision special tokens and padded rows beyond the tokenizer."""
    rows = model.get_output_embeddings().weight.shape[0]
    return sorted(set(range(rows)) - set(allowed_ids))


@torch.no_grad()
def hf_sample(
    model, context: EncodedContext, cfg: RolloutConfig, seed: int, banned: list[int]
) -> tuple[list[int], list[float]]:
    """One completion and log p(y_t) of each token under the temperature-1 policy."""
    torch.manual_seed(seed)
    ids = torch.tensor([context.input_ids], device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=context.pixel_values,
        image_grid_thw=context.image_grid_thw, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k if cfg.top_k > 0 else None, max_new_tokens=cfg.max_new_tokens, suppress_tokens=banned,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    completion = out.sequences[0, ids.shape[1] :].tolist()
    raw = torch.stack(out.logits, dim=1)[0].float().log_softmax(-1)
    logprobs = raw.gather(1, torch.tensor(completion, device=raw.device)[:, None])[:, 0].tolist()
    return completion, logprobs


def make_rollout(sample_id: str, prompt_ids, completion: list[int], logprobs, tokenizer, version: int) -> Rollout:
    eos = {tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
    stopped = bool(completion) and completion[-1] in eos
    return Rollout(
        sample_id=sample_id,
        prompt_ids=list(prompt_ids),
        completion_ids=list(completion),
        logprobs=list(logprobs),
        text=tokenizer.decode(completion, skip_special_tokens=False),
        version=version,
        finish_reason="stop" if stopped else "length",
    )


def hf_rollouts(
    model, processor, samples: list[Sample], cfg: Config, seed: int, banned: list[int], version: int = 0
) -> list[Rollout]:
    """`rollout.samples_per_prompt` completions per sample from `model`, in sample order."""
    rollouts = []
    for s in samples:
        ctx = encode(processor, student_text(processor, s.problem, cfg.prompts), s.image)
        for j in range(cfg.rollout.samples_per_prompt):
            completion, logprobs = hf_sample(model, ctx, cfg.rollout, sample_seed(seed, s.id, j), banned)
            rollouts.append(make_rollout(s.id, ctx.input_ids, completion, logprobs, processor.tokenizer, version))
    return rollouts
