"""SOUL's curvature at work: Sophia's h warmed before step 1 and visible (win rate), the bs a preset
sets survives a run, the reference preset's schedule and groups, and the stopping rules."""

import math

import pytest
import torch
from test_sophia import recorded_gradients
from test_soul import batches, tiny_llama
from transformers import get_linear_schedule_with_warmup

import unlearn_fast.optim.sophia as sophia_module
from unlearn_fast import SOUL
from unlearn_fast.optim import Sophia
from unlearn_fast.training import answer_probability

FORGET, RETAIN = batches(3, 1), batches(2, 2)


def displacement(result, model):
    return torch.cat([(p - q).detach().reshape(-1) for p, q in zip(result.model.parameters(), model.parameters())])


def test_curvature_changes_the_update_and_the_win_rate_shows_it(monkeypatch):
    """The default run (h estimated before step 1) against h = 0 (every coordinate clipped: sign
    momentum). Threshold: the displacements differ by more than 10% of their norm (20% measured;
    the issue saw under 1% before h was warmed; zeroing h in both runs makes this test fail)."""
    model = tiny_llama()
    settings = dict(objective="gdiff", lr=1e-3, steps=6, hessian_interval=3)
    default = SOUL(**settings).unlearn(model, FORGET, RETAIN, progress=False)
    monkeypatch.setattr(Sophia, "update_hessian", lambda self, *args, **kwargs: None)  # h stays 0
    zero = SOUL(**settings).unlearn(model, FORGET, RETAIN, progress=False)
    a, b = displacement(default, model), displacement(zero, model)
    assert (a - b).norm() > 0.1 * b.norm(), ((a - b).norm() / b.norm()).item()
    assert all(r["win_rate"] == 0 for r in zero.history)  # h = 0: nothing unclipped
    rates = [r["win_rate"] for r in default.history]
    assert rates[0] > 0.05 and all(0 < r < 1 for r in rates), rates


def test_without_warmup_h_starts_at_zero():
    """The EMA from 0: until the first refresh (after k steps) every coordinate is clipped."""
    result = SOUL(objective="gdiff", lr=1e-3, steps=4, hessian_interval=3, hessian_warmup=False).unlearn(
        tiny_llama(), FORGET, RETAIN, progress=False
    )
    assert [r["win_rate"] == 0 for r in result.history] == [True, True, True, False]


def test_a_presets_bs_survives_a_soul_run(monkeypatch):
    seen = []
    real = sophia_module.sophia_update

    def spy(*args, **kwargs):
        seen.append(kwargs["bs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sophia_module, "sophia_update", spy)
    result = SOUL(objective="gdiff", optimizer="soul_reference", lr=1e-3, steps=3).unlearn(
        tiny_llama(), FORGET, RETAIN, progress=False
    )
    assert seen and set(seen) == {sophia_module.SOUL_REFERENCE_BS}
    assert [r["bs"] for r in result.history] == [5120.0] * 3
    seen.clear()
    gnb = SOUL(objective="gdiff", lr=1e-3, steps=2).unlearn(tiny_llama(), FORGET, RETAIN, progress=False)
    tokens = [r["bs"] for r in gnb.history]  # GNB without a preset: the step's answer tokens (forget + retain)
    assert seen == tokens and all(t == 2 * 4 * 7 for t in tokens)


def reference_with_schedule(params, grad_seq, lrs, weight_decays):
    """The SOUL reference rule (docs/METHODS.md; tests/test_sophia.py transcribes it) with the
    learning rate of each step given."""
    beta1, beta2, rho, bs = 0.9, 0.95, 0.04, 5120
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grad_seq, lrs):
        for p, g, mi, hi, wd in zip(params, grads, m, h, weight_decays):
            hi.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            mi.mul_(beta1).add_(g, alpha=1 - beta1)
            p.mul_(1 - lr * wd)
            mi.mul_(beta1).add_(g, alpha=1 - beta1)
            p.addcmul_(mi.sign(), (mi.abs() / (rho * bs * hi + 1e-15)).clamp(None, 1), value=-lr)
    return params


def test_reference_preset_replays_the_reference_with_its_schedule_and_groups():
    steps, lr = 20, 0.05
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7)).double()
    named = list(model.named_parameters())
    optimizer, schedule = SOUL(optimizer="soul_reference", lr=lr, steps=steps)._optimizer(model, named)
    # The schedule of the reference's Trainer, from transformers itself.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    hf = get_linear_schedule_with_warmup(probe, num_warmup_steps=math.ceil(0.1 * steps), num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(probe.param_groups[0]["lr"])
        probe.step()
        hf.step()
    grad_seq = recorded_gradients([p.shape for _, p in named], steps=steps)
    init = [p.detach().clone() for _, p in named]
    for grads in grad_seq:
        for (_, p), g in zip(named, grads):
            p.grad = g
        optimizer.step()
        schedule.step()
    # Decay on the linear weight only: not on biases, not on the norm's weight.
    want = reference_with_schedule([p.clone() for p in init], grad_seq, lrs, [0.1, 0.0, 0.0, 0.0])
    for (name, p), p0, w in zip(named, init, want):
        torch.testing.assert_close(p.detach() - p0, w - p0, rtol=1e-6, atol=1e-12, msg=name)
    assert lrs[0] == 0 and max(lrs) == lr and lrs[-1] < lr / 5


def test_stopping_at_a_target_keeps_the_step_it_says():
    model = tiny_llama()
    settings = dict(objective="ga", lr=1e-2, steps=12, optimizer="adamw")
    full = SOUL(**settings).unlearn(model, FORGET, progress=False)
    start, end = answer_probability(model, FORGET), answer_probability(full.model, FORGET)
    target = (start + end) / 2
    result = SOUL(**settings, stop_at_forget_prob=target).unlearn(model, FORGET, progress=False)
    kept = result.metrics["kept_step"]
    assert 0 < kept < 12 and len(result.history) == kept and "<= target" in result.metrics["stop_reason"]
    assert answer_probability(result.model, FORGET) == pytest.approx(result.history[-1]["forget_prob"], abs=1e-9)
    assert result.history[-1]["forget_prob"] <= target < result.history[-2]["forget_prob"]
    # The kept model is the run's state at that step: an unstopped run of `kept` steps.
    short = SOUL(**{**settings, "steps": kept}).unlearn(model, FORGET, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(result.model.parameters(), short.model.parameters()))


def test_gold_model_sets_the_target():
    model, gold = tiny_llama(), tiny_llama(seed=1)
    result = SOUL(objective="ga", lr=1e-2, steps=3, optimizer="adamw").unlearn(
        model, FORGET, gold_model=gold, progress=False
    )
    assert result.metrics["target_forget_prob"] == answer_probability(gold, FORGET)


def test_utility_floor_keeps_the_best_step_above_the_floor():
    model = tiny_llama()
    settings = dict(objective="ga", lr=3e-2, steps=10, optimizer="adamw")
    result = SOUL(**settings, utility_floor=0.9).unlearn(model, FORGET, RETAIN, progress=False)
    kept, initial = result.metrics["kept_step"], result.metrics["initial_retain_prob"]
    assert len(result.history) == 10  # the rule runs every step, then puts the kept one back
    allowed = [r for r in result.history if r["retain_prob"] >= 0.9 * initial]
    if kept:
        best = min(allowed, key=lambda r: r["forget_prob"])
        assert best["step"] == kept
        short = SOUL(**{**settings, "steps": kept}).unlearn(model, FORGET, RETAIN, progress=False)
        assert all(torch.equal(p, q) for p, q in zip(result.model.parameters(), short.model.parameters()))
    else:
        assert not allowed and all(torch.equal(p, q) for p, q in zip(result.model.parameters(), model.parameters()))
    assert any(r["retain_prob"] < 0.9 * initial for r in result.history), "the floor never bit: a weak test"


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_rho_is_set_for_the_target_win_rate(target):
    result = SOUL(objective="gdiff", lr=1e-3, steps=2, target_win_rate=target).unlearn(
        tiny_llama(), FORGET, RETAIN, progress=False
    )
    assert result.history[0]["win_rate"] == pytest.approx(target, abs=0.01)
    assert result.history[0]["rho"] == result.history[1]["rho"] != 0.04  # set once, then kept
    fixed = SOUL(objective="gdiff", lr=1e-3, steps=1, target_win_rate=None).unlearn(
        tiny_llama(), FORGET, RETAIN, progress=False
    )
    assert fixed.history[0]["rho"] == 0.04
