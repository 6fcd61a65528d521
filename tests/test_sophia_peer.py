"""Sophia's authors' SophiaG (the `sophia-opt` package, a test extra) as the peer of our Sophia:
given the same h, the two updates agree to 1e-6 over several steps."""

import pytest
import torch
from sophia_opt import SophiaG

from unlearn_fast.optim import Sophia


def test_sophia_agrees_with_the_authors_sophiag_given_the_same_h():
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (33, 17), (1025,)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    settings = dict(lr=3e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    opt, peer = Sophia(ours, **settings, estimator="gnb"), SophiaG(theirs, **settings)
    bs = 64
    for step in range(8):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * 0.1 for s in shapes]
        for p, q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step(bs=bs)
        peer.step(bs=bs)
        if step % 3 == 2:  # the same Hessian refresh: h <- b2 h + (1 - b2) g_hat^2 from a sampled-label gradient
            sampled = [torch.randn(s, generator=g, dtype=torch.float64) * 0.05 for s in shapes]
            for p, q, grad in zip(ours, theirs, sampled):
                p.grad, q.grad = grad.clone(), grad.clone()
            opt.update_hessian()
            peer.update_hessian()
    moved = max((p - p0).abs().max().item() for p, p0 in zip(ours, init))
    assert moved > 0.05
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["hessian"], peer.state[q]["hessian"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("bs", [1, 5120])
def test_the_clip_rule_matches_the_peer_where_h_is_zero(bs):
    """h = 0 (before any refresh): both take lr * sign(m) steps."""
    p, q = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    grad = torch.tensor([1e-3, -2.0, 0.5, -1e-6, 3.0])
    p.grad, q.grad = grad.clone(), grad.clone()
    Sophia([p], lr=0.1, weight_decay=0.0, estimator="gnb").step(bs=bs)
    SophiaG([q], lr=0.1, weight_decay=0.0).step(bs=bs)
    torch.testing.assert_close(p, q)
