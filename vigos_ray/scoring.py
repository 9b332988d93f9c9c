"""Teacher forcing at chosen positions: batched forwards by token budget, and the teacher payloads (SPEC §7).

`hidden_at` is shared by teachers (no grad) and the learner's student forward (with grad): both run the
language model on packed, right-padded rows and keep the final hidden state only where a token is scored, so the
output head is applied to those positions alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from vigos_ray.config import Config
from vigos_ray.losses import upcast
from vigos_ray.types import ScoreRow, TeacherTargets

Payload = Literal["hidden", "topk", "sampled"]


def pack_by_tokens(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group row indices into batches whose padded size (rows x longest row) stays within `token_budget`.

    Rows are taken longest first so that similar lengths share a batch; a row longer than the budget runs alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _forward(model, rows: Sequence[ScoreRow], pad_id: int) -> list[torch.Tensor]:
    """One padded forward of `rows`; the hidden states that predict each row's scored tokens."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[b, : len(r.input_ids)] = 1
    pixels = [r.pixel_values for r in rows if r.pixel_values is not None]
    grids = [r.image_grid_thw for r in rows if r.image_grid_thw is not None]
    out = model.model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        pixel_values=torch.cat(pixels).to(model.device) if pixels else None,
        image_grid_thw=torch.cat(grids).to(model.device) if grids else None,
    )
    hidden = out.last_hidden_state
    return [hidden[b, torch.tensor(r.scored, dtype=torch.long) - 1] for b, r in enumerate(rows)]


def hidden_at(model, rows: Sequence[ScoreRow], token_budget: int, pad_id: int = 0) -> list[torch.Tensor]:
    """Per row, the final normalized hidden states [len(scored), d] predicting its scored tokens, in row order.

    Runs under the caller's grad mode: teachers call it under `torch.no_grad()`, the learner with grad.
    """
    if any(min(r.scored, default=1) < 1 for r in rows):
        raise ValueError("a scored index must be >= 1: position 0 has no preceding context to predict it")
    result: list[torch.Tensor | None] = [None] * len(rows)
    for batch in pack_by_tokens([len(r.input_ids) for r in rows], token_budget):
        for i, h in zip(batch, _forward(model, [rows[i] for i in batch], pad_id), strict=True):
            result[i] = h
    return result  # type: ignore[return-value]


def output_head(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


@torch.no_grad()
def teacher_targets(
    model,
    rows: Sequence[ScoreRow],
    payload: Payload,
    vocab_size: int,
    token_budget: int,
    topk: int = 64,
    temperature: float = 1.0,
    pad_id: int = 0,
    chunk_tokens: int = 1024,
) -> list[TeacherTargets]:
    """What a frozen teacher ships for each row's scored tokens; logits exist only at scored positions."""
    hidden = hidden_at(model, rows, token_budget, pad_id)
    if payload == "hidden":
        return [TeacherTargets("hidden", hidden=h) for h in hidden]
    head = output_head(model)[:vocab_size]
    out = []
    for row, h in zip(rows, hidden, strict=True):
        targets = torch.tensor([row.input_ids[j] for j in row.scored], dtype=torch.long, device=h.device)
        chunks = [
            _payload_chunk(h[lo : lo + chunk_tokens], targets[lo : lo + chunk_tokens], head, payload, topk, temperature)
            for lo in range(0, max(h.shape[0], 1), chunk_tokens)
        ]
        out.append(concat_targets(chunks))
    return out


def pool_targets(model, rows: Sequence[ScoreRow], cfg: Config, role: str, vocab_size: int, pad_id: int):
    """`teacher_targets` with the payload, budget and temperature that `cfg` sets for the pool of `role`."""
    budget, s = cfg.teachers[role].token_budget, cfg.scoring
    return teacher_targets(
        model, rows, s.payload, vocab_size, budget, s.topk, cfg.loss.temperature, pad_id, cfg.loss.chunk_tokens
    )


def _payload_chunk(h, targets, head, payload: Payload, topk: int, temperature: float) -> TeacherTargets:
    lp = F.log_softmax(upcast(h @ head.T) / temperature, dim=-1)
    if payload == "sampled":
        return TeacherTargets("sampled", token_logprobs=lp.gather(1, targets[:, None])[:, 0])
    top_lp, top_ids = lp.topk(min(topk, head.shape[0]), dim=-1)
    tail = torch.logsumexp(lp.scatter(1, top_ids, float("-inf")), dim=-1)  # log of the mass outside the k ids
    return TeacherTargets("topk", topk_ids=top_ids, topk_logprobs=top_lp, tail_logprob=tail)


def concat_targets(targets: Sequence[TeacherTargets]) -> TeacherTargets:
    """The rows' targets as one batch of tokens, in row order."""
    payload = targets[0].payload
    if any(t.payload != payload for t in targets):
        raise ValueError("cannot concatenate teacher targets of different payloads")
    fields = {n: torch.cat([getattr(t, n) for t in targets]) for n in TeacherTargets.TENSORS
              if getattr(targets[0], n) is not None}  # fmt: skip
    return TeacherTargets(payload, **fields)
