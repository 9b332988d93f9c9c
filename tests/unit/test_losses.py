"""The objective's math against direct formulas, an independent implementation (TRL), and its memory bound."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vigos_ray.losses import DivergenceSpec, pooled_mean, token_divergence, token_losses
from vigos_ray.scoring import _payload_chunk
from vigos_ray.types import TeacherTargets

N, D, V, PAD_ROWS = 13, 16, 50, 6


def direct(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0):
    """Textbook formulas, written independently of vigos_ray.losses."""
    p = torch.softmax(student_logits / temperature, -1)
    q = torch.softmax(teacher_logits / temperature, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if kind == "forward":
        return kl(q, p)
    if kind == "reverse":
        return kl(p, q)
    m = beta * q + (1 - beta) * p
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 7, V, generator=g, dtype=torch.float64) * 3, torch.randn(
        4, 7, V, generator=g, dtype=torch.float64
    ) * 3


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_divergences_match_direct_formulas_in_float64(logits, kind, beta, temperature):
    s, t = logits
    ours = token_divergence(s, t, kind, beta=beta, temperature=temperature)
    assert ours.shape == (4, 7)
    torch.testing.assert_close(ours, direct(s, t, kind, beta, temperature), atol=1e-10, rtol=0)
    assert (ours >= -1e-12).all()


def test_masked_token_mean_matches_direct_formula(logits):
    s, t = logits
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    ours = pooled_mean(token_divergence(s, t, "forward")[mask], int(mask.sum()))
    expected = (direct(s, t, "forward") * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def test_jsd_beta_limits_follow_trl_convention(logits):
    s, t = logits
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0), direct(s, t, "forward"), atol=1e-10, rtol=0)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0), direct(s, t, "reverse"), atol=1e-10, rtol=0)


def _hidden_case(dtype=torch.float64, n=N):
    g = torch.Generator().manual_seed(2)
    h_s = torch.randn(n, D, generator=g, dtype=dtype, requires_grad=True)
    h_t = torch.randn(n, D, generator=g, dtype=dtype)
    head = torch.randn(V + PAD_ROWS, D, generator=g, dtype=dtype)
    head[V:] = 50.0  # padded rows beyond the tokenizer: huge logits that must not count on either side
    head.requires_grad_(True)
    teacher_head = head.detach() + 0.1 * torch.randn(V + PAD_ROWS, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    return h_s, h_t, head, teacher_head, targets


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_hidden_payload_loss_equals_full_logit_loss_values_and_gradients(kind):
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    spec = DivergenceSpec(kind, beta=0.3, temperature=0.9)
    ours, _ = token_losses(
        h_s, head, TeacherTargets("hidden", hidden=h_t), targets, spec, V, teacher_head, chunk_tokens=4
    )
    full = token_divergence(h_s @ head[:V].T, h_t @ teacher_head[:V].T, kind, beta=0.3, temperature=0.9)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=0)
    g_ours = torch.autograd.grad(ours.sum(), [h_s, head])
    g_full = torch.autograd.grad(full.sum(), [h_s, head])
    for a, b in zip(g_ours, g_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert g_ours[1][V:].abs().max() == 0  # padded head rows get no gradient


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward), and every output's shape."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


def test_chunked_loss_never_materializes_all_tokens_times_vocab():
    n, chunk = 64, 8
    h_s, h_t, head, teacher_head, targets = _hidden_case(torch.float32, n=n)
    spec = DivergenceSpec("forward")
    with LargestTensor() as chunked:
        loss, _ = token_losses(h_s, head, TeacherTargets("hidden", hidden=h_t), targets, spec, V, teacher_head, chunk)
        loss.sum().backward()
    with LargestTensor() as full:
        token_divergence(h_s @ head[:V].T, h_t @ teacher_head[:V].T, "forward").sum().backward()
    assert full.largest >= n * V  # the reference path does hold [tokens, vocab]
    # The chunked path holds at most two chunks of logits, or the [tokens, d] / [vocab, d] inputs and their grads.
    assert chunked.largest <= max(2 * chunk * (V + PAD_ROWS), n * D, (V + PAD_ROWS) * D)
    assert chunked.largest < n * V / 2


@pytest.mark.parametrize("kind, clip_mode", [("forward", "none"), ("reverse", "none"), ("reverse", "token")])
@pytest.mark.parametrize("head_trains", [True, False])
def test_fused_head_and_loss_equal_the_autograd_path_values_and_gradients(kind, clip_mode, head_trains):
    """The fused path's closed-form gradients equal autograd's through the chunked, checkpointed path, for any
    upstream gradient per token (not only a mean), for the hidden states and, when it trains, the head."""
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    head.requires_grad_(head_trains)
    teacher = TeacherTargets("hidden", hidden=h_t)
    _, div = token_losses(h_s, head, teacher, targets, DivergenceSpec(kind), V, teacher_head, fused=False)
    spec = DivergenceSpec(kind, temperature=0.9, clip_mode=clip_mode, clip=float(div.median()))
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inputs = [h_s, head] if head_trains else [h_s]
    out = {}
    for fused in (True, False):
        loss, div = token_losses(h_s, head, teacher, targets, spec, V, teacher_head, chunk_tokens=4, fused=fused)
        out[fused] = (loss, div, torch.autograd.grad((loss * upstream).sum(), inputs))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-12, rtol=0)
    for a, b in zip(out[True][2], out[False][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not out[True][1].requires_grad


def test_fused_loss_in_bfloat16_runs_in_the_heads_dtype_and_agrees_with_autograd():
    """A bf16 model (the GPU configs): the fused path keeps the hidden states' and head's dtypes for the
    gradients it returns and agrees with the autograd path to bf16 precision."""
    h_s, h_t, head, teacher_head, targets = _hidden_case(torch.float32)
    h_s = h_s.detach().bfloat16().requires_grad_(True)
    head, teacher_head = head.detach().bfloat16().requires_grad_(True), teacher_head.bfloat16()
    teacher = TeacherTargets("hidden", hidden=h_t.bfloat16())
    grads = {}
    for fused in (True, False):
        loss, _ = token_losses(h_s, head, teacher, targets, DivergenceSpec("reverse"), V, teacher_head, 4, fused=fused)
        grads[fused] = torch.autograd.grad(loss.sum(), [h_s, head])
    for a, b in zip(grads[True], grads[False], strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=0.05 * b.float().abs().max().item(), rtol=0)


def test_fused_loss_with_a_frozen_head_recomputes_no_logits_in_backward():
    n, chunk = 64, 8
    h_s, h_t, head, teacher_head, targets = _hidden_case(torch.float32, n=n)
    teacher = TeacherTargets("hidden", hidden=h_t)
    for fused, expected in ((True, False), (False, True)):
        loss, _ = token_losses(h_s, head.detach(), teacher, targets, DivergenceSpec("reverse"), V, teacher_head,
                               chunk, fused=fused)  # fmt: skip
        with LargestTensor() as backward:
            loss.sum().backward()
        assert ((chunk, V) in backward.shapes) == expected  # the autograd path rebuilds each chunk's logits


def test_topk_payload_with_k_equal_to_vocab_equals_the_full_loss():
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    spec = DivergenceSpec("reverse", temperature=1.3)
    topk = _payload_chunk(h_t, targets, teacher_head[:V], "topk", V, 1.3)
    assert torch.isneginf(topk.tail_logprob).all()
    ours, _ = token_losses(h_s, head, topk, targets, spec, V)
    full = token_divergence(h_s @ head[:V].T, h_t @ teacher_head[:V].T, "reverse", temperature=1.3)
    torch.testing.assert_close(ours, full, atol=1e-10, rtol=0)
    (g_ours,) = torch.autograd.grad(ours.sum(), [h_s])
    (g_full,) = torch.autograd.grad(full.sum(), [h_s])
    torch.testing.assert_close(g_ours, g_full, atol=1e-10, rtol=0)
    assert torch.isfinite(g_ours).all()


def test_topk_tail_bucket_penalizes_student_mass_outside_the_support():
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    topk = _payload_chunk(h_t, targets, teacher_head[:V], "topk", 5, 1.0)
    ours, _ = token_losses(h_s, head, topk, targets, DivergenceSpec("forward"), V)
    full = token_divergence(h_s @ head[:V].T, h_t @ teacher_head[:V].T, "forward")
    # Grouping outcomes never increases a KL (data processing), and here the grouped KL is still far from zero.
    assert (ours <= full + 1e-12).all()
    assert (ours > 0).all()


def test_token_clip_zeroes_the_gradient_of_tokens_above_the_cap_and_entry_clip_does_not():
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    teacher = TeacherTargets("hidden", hidden=h_t)
    unclipped, div = token_losses(h_s, head, teacher, targets, DivergenceSpec("forward"), V, teacher_head)
    cap = float(div.median())
    above = div > cap
    assert 0 < above.sum() < N
    token, _ = token_losses(
        h_s, head, teacher, targets, DivergenceSpec("forward", clip_mode="token", clip=cap), V, teacher_head
    )
    entry, _ = token_losses(
        h_s, head, teacher, targets, DivergenceSpec("forward", clip_mode="entry", clip=cap), V, teacher_head
    )
    torch.testing.assert_close(token, div.clamp(max=cap))
    (g_token,) = torch.autograd.grad(token.sum(), [h_s])
    (g_entry,) = torch.autograd.grad(entry.sum(), [h_s])
    assert g_token[above].abs().max() == 0 and g_token[~above].abs().min() > 0
    assert g_entry[above].abs().amin(dim=1).max() > 0  # entry-wise clipping keeps a gradient for every token
    assert (entry <= unclipped + 1e-12).all() and not torch.allclose(entry, token)


def test_sampled_reverse_kl_is_the_policy_gradient_with_advantage_log_q_minus_log_p():
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    lq = torch.log_softmax(h_t @ teacher_head[:V].T, -1).gather(1, targets[:, None])[:, 0]
    loss, estimate = token_losses(
        h_s, head, TeacherTargets("sampled", token_logprobs=lq), targets, DivergenceSpec("sampled"), V
    )
    lp = torch.log_softmax(h_s @ head[:V].T, -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(estimate, (lp - lq).detach())
    (g,) = torch.autograd.grad(loss.sum(), [h_s])
    (g_expected,) = torch.autograd.grad((-(lq - lp).detach() * lp).sum(), [h_s])
    torch.testing.assert_close(g, g_expected)


def test_segment_mean_split_over_two_ranks_one_empty_gives_the_single_process_gradient():
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    teacher = TeacherTargets("hidden", hidden=h_t)
    spec = DivergenceSpec("forward")

    def rank_grad(idx, global_count, world):
        h = h_s.detach()[idx].clone().requires_grad_(True)
        t = TeacherTargets("hidden", hidden=h_t[idx])
        per_token, _ = token_losses(h, head.detach(), t, targets[idx], spec, V, teacher_head)
        pooled_mean(per_token, global_count, world).backward()
        full = torch.zeros_like(h_s)
        full[idx] = h.grad
        return full

    per_token, _ = token_losses(h_s, head.detach(), teacher, targets, spec, V, teacher_head)
    (single,) = torch.autograd.grad(pooled_mean(per_token, N), [h_s])
    everything, nothing = torch.arange(N), torch.zeros(0, dtype=torch.long)
    first, second = torch.arange(0, 5), torch.arange(5, N)
    for a, b in [(everything, nothing), (first, second)]:
        averaged = (rank_grad(a, N, 2) + rank_grad(b, N, 2)) / 2  # what data-parallel gradient averaging does
        torch.testing.assert_close(averaged, single, atol=1e-12, rtol=0)


def test_batch_order_does_not_change_the_pooled_loss():
    h_s, h_t, head, teacher_head, targets = _hidden_case()
    spec = DivergenceSpec("jsd", beta=0.4, clip_mode="token", clip=0.5)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    a, _ = token_losses(h_s, head, TeacherTargets("hidden", hidden=h_t), targets, spec, V, teacher_head, 5)
    b, _ = token_losses(
        h_s[perm], head, TeacherTargets("hidden", hidden=h_t[perm]), targets[perm], spec, V, teacher_head, 3
    )
    torch.testing.assert_close(pooled_mean(a, N), pooled_mean(b, N), atol=1e-12, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_generalized_jsd_matches_trl(logits, beta, temperature):
    """Golden parity with an independent implementation: TRL's GKD loss (masked token mean)."""
    from trl.experimental import gkd  # in the `test` extra: never skipped

    s, t = logits
    labels = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(4))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    mask = labels != -100
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    ours = pooled_mean(token_divergence(s, t, "jsd", beta=beta, temperature=temperature)[mask], int(mask.sum()))
    torch.testing.assert_close(ours, trl_loss, atol=1e-10, rtol=0)
