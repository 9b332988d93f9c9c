"""The distillation objective in pure torch: per-token divergences, clipping, and pooled segment means (SPEC §6).

Every student token t in a segment gets a divergence between the student's next-token distribution p and a
teacher's q, both at the distillation temperature: forward KL(q||p), reverse KL(p||q), or TRL's generalized JSD
(beta=0 is forward KL, beta=1 reverse KL, otherwise beta*KL(q||m) + (1-beta)*KL(p||m), m = beta*q + (1-beta)*p).
The `sampled` kind is the sampled-token reverse-KL policy gradient: advantage A_t = log q(y_t) - log p(y_t),
loss -A_t * log p(y_t) with A_t held constant. A segment's loss is its pooled token mean over all data-parallel
ranks; the step loss is the weighted sum of the segment losses.

The student's logits are never held for all tokens at once: `token_losses` applies the output head to chunks of
hidden states under activation checkpointing, so peak memory is one chunk of [tokens, vocab] in both passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vigos_ray.types import TeacherTargets

DivergenceKind = Literal["forward", "reverse", "jsd", "sampled"]
ClipMode = Literal["token", "entry", "none"]


@dataclass(frozen=True)
class DivergenceSpec:
    kind: DivergenceKind
    beta: float = 0.5  # jsd only
    temperature: float = 1.0
    clip_mode: ClipMode = "none"
    clip: float = 0.05


def _weighted_log_ratio(a_lp: torch.Tensor, b_lp: torch.Tensor) -> torch.Tensor:
    """Entries exp(a) * (a - b) of KL(a||b), exactly 0 where exp(a) is 0 (also in the gradient)."""
    zero = torch.isneginf(a_lp)
    a = a_lp.masked_fill(zero, 0.0)
    b = b_lp.masked_fill(zero, 0.0)
    return (a.exp() * (a - b)).masked_fill(zero, 0.0)


def divergence_entries(s_lp: torch.Tensor, t_lp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-vocabulary-entry terms whose sum over the last dim is the divergence. Inputs are log-probabilities."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        return _weighted_log_ratio(t_lp, s_lp)
    if kind == "reverse":
        return _weighted_log_ratio(s_lp, t_lp)
    if kind == "jsd":
        m_lp = torch.logsumexp(torch.stack([s_lp + math.log1p(-beta), t_lp + math.log(beta)]), dim=0)
        return beta * _weighted_log_ratio(t_lp, m_lp) + (1 - beta) * _weighted_log_ratio(s_lp, m_lp)
    raise ValueError(f"unknown divergence kind {kind!r}; expected forward, reverse or jsd")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    entry_clip: float | None = None,
) -> torch.Tensor:
    """Divergence per token ([..., V] logits -> [...]); `entry_clip` caps each vocabulary term before the sum."""
    s_lp = F.log_softmax(student_logits / temperature, dim=-1)
    t_lp = F.log_softmax(teacher_logits / temperature, dim=-1)
    entries = divergence_entries(s_lp, t_lp, kind, beta)
    if entry_clip is not None:
        entries = entries.clamp(max=entry_clip)
    return entries.sum(-1)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go to float32 for the softmax; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _chunk_losses(
    spec: DivergenceSpec,
    vocab_size: int,
    student_head: torch.Tensor,
    teacher_head: torch.Tensor | None,
    h_s: torch.Tensor,
    targets: torch.Tensor,
    t_hidden: torch.Tensor | None,
    t_ids: torch.Tensor | None,
    t_lp_k: torch.Tensor | None,
    t_tail: torch.Tensor | None,
    t_token: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, divergence) for one chunk of tokens; see `token_losses`."""
    s_logits = upcast(h_s @ student_head[:vocab_size].T) / spec.temperature
    s_lp = F.log_softmax(s_logits, dim=-1)
    if spec.kind == "sampled":
        lp = s_lp.gather(1, targets[:, None])[:, 0]
        log_ratio = lp - upcast(t_token)  # per-token estimate of KL(p||q)
        advantage = -log_ratio.detach()
        if spec.clip_mode == "token":
            advantage = advantage.clamp(-spec.clip, spec.clip)
        return -advantage * lp, log_ratio.detach()
    if t_hidden is not None:
        t_logits = upcast(t_hidden.to(teacher_head.dtype) @ teacher_head[:vocab_size].T) / spec.temperature
        t_lp = F.log_softmax(t_logits, dim=-1)
    else:  # top-k support plus one bucket for all other ids
        s_in = s_lp.gather(1, t_ids)
        s_tail = torch.logsumexp(s_lp.scatter(1, t_ids, float("-inf")), dim=-1, keepdim=True)
        s_lp = torch.cat([s_in, s_tail], dim=1)
        t_lp = torch.cat([upcast(t_lp_k), upcast(t_tail)[:, None]], dim=1)
    entries = divergence_entries(s_lp, t_lp, spec.kind, spec.beta)
    divergence = entries.sum(-1)
    if spec.clip_mode == "entry":
        return entries.clamp(max=spec.clip).sum(-1), divergence.detach()
    if spec.clip_mode == "token":
        return divergence.clamp(max=spec.clip), divergence.detach()
    return divergence, divergence.detach()


class _FusedHeadKL(torch.autograd.Function):
    """Forward or reverse KL against a `hidden` payload with the output head applied chunk by chunk, and the
    gradient with respect to the student's hidden states computed in the same pass from its closed form
    (forward KL: p - q; reverse KL: p * (log p - log q - KL); divided by the temperature; zero for a token
    clipped by `clip`). Backward then only scales that [N, d] gradient by each token's upstream gradient: no
    chunk is recomputed, where the autograd path recomputes both heads' products and softmaxes under activation
    checkpointing. Only a trainable student head needs a second pass (its gradient depends on every token's
    upstream gradient, known only in backward); a frozen head (LoRA) never does."""

    @staticmethod
    def forward(ctx, h, head, t_hidden, t_head, kind: str, temperature: float, clip: float | None, vocab: int,
                chunk: int):  # fmt: skip
        grad_h = torch.empty(h.shape, dtype=upcast(h.new_zeros(())).dtype, device=h.device)
        losses, divergences = [], []
        for lo in range(0, h.shape[0], chunk):
            loss, div, delta = _fused_chunk(h[lo : lo + chunk], head, t_hidden[lo : lo + chunk], t_head, kind,
                                            temperature, clip, vocab)  # fmt: skip
            grad_h[lo : lo + chunk] = delta.to(head.dtype) @ head[:vocab]  # as autograd would: in the head's dtype
            losses.append(loss)
            divergences.append(div)
        ctx.save_for_backward(h, head, t_hidden, t_head, grad_h)
        ctx.settings = (kind, temperature, clip, vocab, chunk)
        divergence = torch.cat(divergences)
        ctx.mark_non_differentiable(divergence)
        return torch.cat(losses), divergence

    @staticmethod
    def backward(ctx, g_loss, g_div):
        h, head, t_hidden, t_head, grad_h = ctx.saved_tensors
        kind, temperature, clip, vocab, chunk = ctx.settings
        g = upcast(g_loss)[:, None]
        grad_head = None
        if ctx.needs_input_grad[1]:
            grad_head = torch.zeros(head.shape, dtype=grad_h.dtype, device=head.device)
            for lo in range(0, h.shape[0], chunk):
                _, _, delta = _fused_chunk(h[lo : lo + chunk], head, t_hidden[lo : lo + chunk], t_head, kind,
                                           temperature, clip, vocab)  # fmt: skip
                grad_head[:vocab] += (delta * g[lo : lo + chunk]).T @ upcast(h[lo : lo + chunk])
            grad_head = grad_head.to(head.dtype)
        return (g * grad_h).to(h.dtype), grad_head, None, None, None, None, None, None, None


@torch.no_grad()
def _fused_chunk(h, head, t_hidden, t_head, kind: str, temperature: float, clip: float | None, vocab: int):
    """(clipped loss, divergence, d loss / d student logits) of one chunk of tokens; see `_FusedHeadKL`."""
    s_lp = upcast(h @ head[:vocab].T)
    t_lp = upcast(t_hidden.to(t_head.dtype) @ t_head[:vocab].T)
    if temperature != 1.0:
        s_lp.div_(temperature)
        t_lp.div_(temperature)
    s_lp = F.log_softmax(s_lp, dim=-1)
    t_lp = F.log_softmax(t_lp, dim=-1)
    p = s_lp.exp()
    if kind == "forward":  # KL(q||p) = sum q (log q - log p); gradient p - q
        q = t_lp.exp()
        div = (q * (t_lp - s_lp)).sum(-1)
        delta = p.sub_(q)
    else:  # KL(p||q) = sum p (log p - log q); gradient p * (log p - log q - KL)
        ratio = s_lp.sub_(t_lp)
        div = (p * ratio).sum(-1)
        delta = p.mul_(ratio.sub_(div[:, None]))
    if temperature != 1.0:
        delta.div_(temperature)
    loss = div
    if clip is not None:
        loss = div.clamp(max=clip)
        delta.mul_((div <= clip).to(delta.dtype)[:, None])  # clamp's gradient: none above the cap
    return loss, div, delta


def token_losses(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher: TeacherTargets,
    target_ids: torch.Tensor,
    spec: DivergenceSpec,
    vocab_size: int,
    teacher_head: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (differentiable, clipped as `spec` says) and per-token divergence (detached, unclipped).

    student_hidden [N, d] final normalized hidden states predicting `target_ids` [N]; student_head [V', d] the
    student's output head; `teacher` holds the same N tokens in its payload; `teacher_head` [V', d] is the frozen
    initial head for `hidden` payloads. Rows >= vocab_size (padded head rows) are dropped on both sides.
    Forward and reverse KL on `hidden` payloads (no entry-wise clipping) take the fused path (`_FusedHeadKL`)
    unless `fused=False`; every other case goes through autograd with each chunk recomputed in backward.
    """
    if spec.kind == "sampled" and teacher.token_logprobs is None:
        raise ValueError("the sampled divergence needs teacher token log-probs (scoring.payload=sampled)")
    if teacher.payload == "hidden" and teacher_head is None:
        raise ValueError("hidden teacher payloads need the frozen initial output head (teacher_head)")
    if spec.kind != "sampled" and teacher.payload == "sampled":
        raise ValueError(f"a {spec.kind} divergence needs teacher distributions; a sampled payload has none")
    fusable = teacher.payload == "hidden" and spec.kind in ("forward", "reverse") and spec.clip_mode != "entry"
    if fused and fusable and student_hidden.shape[0] > 0:
        clip = spec.clip if spec.clip_mode == "token" else None
        return _FusedHeadKL.apply(student_hidden, student_head, teacher.hidden, teacher_head, spec.kind,
                                  spec.temperature, clip, vocab_size, chunk_tokens)  # fmt: skip
    fields = (teacher.hidden, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob, teacher.token_logprobs)
    losses, divergences = [], []
    for lo in range(0, student_hidden.shape[0], chunk_tokens):
        hi = lo + chunk_tokens
        chunk = [None if x is None else x[lo:hi] for x in fields]
        loss, div = checkpoint(
            _chunk_losses, spec, vocab_size, student_head, teacher_head, student_hidden[lo:hi], target_ids[lo:hi],
            *chunk, use_reentrant=False,
        )  # fmt: skip
        losses.append(loss)
        divergences.append(div)
    if not losses:
        empty = upcast(student_hidden.new_zeros(0))
        return empty + 0.0 * student_hidden.sum(), empty
    return torch.cat(losses), torch.cat(divergences)


def pooled_mean(token_loss: torch.Tensor, global_count: int, world_size: int = 1) -> torch.Tensor:
    """This rank's share of a segment's token mean over all ranks: local_sum * world / global_count.

    Data-parallel training averages gradients over ranks, so the ranks' shares average to global_sum /
    global_count, whatever the split of tokens between ranks (a rank with none contributes zero).
    """
    return token_loss.sum() * world_size / max(global_count, 1)
