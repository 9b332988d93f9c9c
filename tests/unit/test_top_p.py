"""Top-p among the top-k (workers/top_p.py) against vLLM's own sort-based top-k/top-p, which it replaces on CPU."""

from __future__ import annotations

import pytest
import torch

from workers.top_p import top_p_among_top_k


@pytest.mark.parametrize("seed", range(5))
def test_leaves_exactly_the_logits_vllms_top_k_top_p_leaves(seed):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 151_936, generator=g) * 3
    k = torch.randint(1, 64, (8,), generator=g)
    p = torch.rand(8, generator=g) * 0.99 + 0.01
    ours, vllms = top_p_among_top_k(logits.clone(), k, p), apply_top_k_top_p_pytorch(logits.clone(), k, p)
    assert torch.equal(ours, vllms)
    kept = torch.isfinite(ours).sum(1)
    assert bool((kept >= 1).all() and (kept <= k).all()) and bool((kept < k).any())  # top-p did cut


def test_a_tie_at_the_kth_value_keeps_every_tied_logit_as_vllm_does():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, -1.0, -2.0]])
    k, p = torch.tensor([3]), torch.tensor([1.0])
    ours = top_p_among_top_k(logits.clone(), k, p)
    assert torch.equal(ours, apply_top_k_top_p_pytorch(logits.clone(), k, p))
    assert torch.isfinite(ours).sum() == 5
