"""Chunked log-probs through a frozen head equal the full [N, vocab] computation, value and gradient."""

from __future__ import annotations

import pytest
import torch

from ember.tune.loss import token_logprobs


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_full(chunk):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    h = torch.randn(23, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (23,), generator=g)
    w = torch.randn(23, generator=g)
    logp, correct = token_logprobs(h, head, y, chunk)
    (logp * w).sum().backward()
    got = h.grad.clone()
    h.grad = None
    logits = head(h)
    ref = logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    (ref * w).sum().backward()
    assert torch.allclose(logp, ref, atol=1e-6)
    assert torch.allclose(got, h.grad, atol=1e-6)
    assert torch.equal(correct, logits.argmax(-1) == y)


def test_trainable_head_is_refused():
    with pytest.raises(ValueError, match="freeze"):
        token_logprobs(torch.randn(2, 4), torch.nn.Linear(4, 5), torch.tensor([0, 1]))
