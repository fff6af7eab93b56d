"""Token log-probabilities through the LM head without materialising [tokens, vocab] logits at once.

`token_logprobs` runs the rows through lm_head + log-softmax a chunk at a time and, in the same pass,
works out each row's gradient with respect to its hidden state, d logp(y)/dh = (onehot(y) - softmax) @ W
(the head is frozen, so no weight gradient is needed). Backward is then one multiply by the incoming
gradient: no logits are kept or recomputed, and peak memory is one chunk's [chunk, vocab] floats.
SFT's loss is -sum(logp) / supervised tokens; DPO's sums logp per sequence.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024  # [1024, 49152] float32 logits: 192 MiB for the default model's vocabulary


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # hidden [N, H], weight [V, H], targets [N]
        need_grad = ctx.needs_input_grad[0]
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], targets[s : s + chunk]
            logits = (h @ weight.t()).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            logp[s : s + chunk] = logits.gather(1, y[:, None]).squeeze(1) - lse
            correct[s : s + chunk] = logits.argmax(dim=-1) == y
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # in place: softmax, reusing the logits
                probs.scatter_add_(1, y[:, None], probs.new_full((y.shape[0], 1), -1.0))
                grad[s : s + chunk] = (probs.to(weight.dtype) @ weight).neg_()  # (onehot - p) @ W
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return logp, correct

    @staticmethod
    def backward(ctx, grad_logp, _grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_logp[:, None].to(grad.dtype), None, None, None


def token_logprobs(
    hidden: torch.Tensor,  # [N, hidden], the rows that predict `targets`
    lm_head: torch.nn.Linear,
    targets: torch.Tensor,  # [N] long
    chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log p(target) [N] float32, differentiable in `hidden`; argmax == target [N] bool)."""
    if lm_head.weight.requires_grad:
        raise ValueError("token_logprobs computes no gradient for the LM head; freeze it (LoRA does)")
    return _TokenLogprobs.apply(hidden, lm_head.weight, targets, chunk)
