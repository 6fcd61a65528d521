"""Cut Cross-Entropy (Apple's `cut-cross-entropy`, a test extra) as the peer of our token log-probs:
the same summed cross-entropy and the same gradients, with the head frozen and trainable. Its
``torch_compile`` implementation is the one that runs on CPUs (bench/lm_head.py times the two)."""

import pytest
import torch

from unlearn_fast.ops import reference_token_logprobs, token_logprob_sum

cce = pytest.importorskip("cut_cross_entropy")


@pytest.mark.parametrize("trainable", [False, True])
def test_cce_gives_our_loss_and_gradients(trainable):
    g = torch.Generator().manual_seed(0)
    tokens, width, vocab = 37, 24, 301
    x = torch.randn(tokens, width, generator=g, requires_grad=True)
    w = (torch.randn(vocab, width, generator=g) * 0.5).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = -100  # ignored by both
    trained = (x, w) if trainable else (x,)

    ours = token_logprob_sum(x, w, labels, torch.full((tokens,), -1.0), chunk_rows=8).total
    theirs = cce.linear_cross_entropy(x, w, labels, reduction="sum", impl="torch_compile")
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(trainable)
    want = -reference_token_logprobs(x64, w64, labels).logp.sum()
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.double(), want, rtol=1e-5, atol=1e-5)

    grads_want = torch.autograd.grad(want, (x64, w64) if trainable else (x64,))
    for got in (torch.autograd.grad(ours, trained), torch.autograd.grad(theirs, trained)):
        for a, b in zip(got, grads_want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
