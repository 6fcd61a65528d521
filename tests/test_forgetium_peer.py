"""forgetium (an unlearning library on the package index, a test extra) is the peer that
bench/test_objectives.py times against; here both compute the same losses and gradients, so the
benchmark compares one computation. Tiny random Llama in float64, weights moved away from the
reference so that NPO's log-ratio is not trivially zero."""

import copy

import pytest
import torch
from test_objectives import make_batch, perturb, tiny_llama

from unlearn_fast.objectives import make_objective

forgetium = pytest.importorskip("forgetium", reason="the peer is a test extra: pip install -e '.[test]'")
from forgetium.core.config import UnlearningConfig  # noqa: E402
from forgetium.methods.gradient_ascent import GradientAscentUnlearner  # noqa: E402
from forgetium.methods.gradient_difference import GradientDifferenceUnlearner  # noqa: E402
from forgetium.methods.npo import NPOUnlearner  # noqa: E402

PEERS = {
    "ga": (lambda m: GradientAscentUnlearner(m, None, UnlearningConfig()), {}),
    "gdiff": (lambda m: GradientDifferenceUnlearner(m, None, UnlearningConfig()), {}),
    "npo": (lambda m: NPOUnlearner(m, None, UnlearningConfig(), beta=0.1, retain_weight=1.0), {"beta": 0.1}),
}


@pytest.mark.parametrize("name", list(PEERS))
def test_same_loss_and_gradients_as_forgetium(name):
    model = tiny_llama()
    forget, retain = make_batch(n=4, seed=0), make_batch(n=3, seed=1)
    build_peer, kwargs = PEERS[name]
    ours = make_objective(name, **kwargs)
    ours.prepare(model, [forget], [retain])
    peer = build_peer(copy.deepcopy(model))
    peer.prepare()  # NPO: the peer keeps a frozen copy of the initial model as its reference
    perturb(model)
    perturb(peer.model)

    loss, _ = ours.loss(model, forget, retain)
    peer_loss, _ = peer.compute_loss(forget, retain)
    # The peer's cross-entropy is Hugging Face's, which casts the logits to float32: hence 1e-6 of
    # each term (GradDiff's two terms nearly cancel).
    torch.testing.assert_close(loss, peer_loss.to(loss.dtype), rtol=1e-6, atol=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    peer_grads = torch.autograd.grad(peer_loss, list(peer.model.parameters()))
    for g, p in zip(grads, peer_grads):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-7)
