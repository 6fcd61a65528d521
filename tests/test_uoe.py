"""UOE on tiny MoE models of every family: attribution, what trains, prefix caching, safety."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast import UOE, attribute_experts
from unlearn_fast.objectives import RMU, GradDiff
from unlearn_fast.models import MOE_FAMILIES, moe_family, moe_layers, tiny_moe


def make_batches(seed: int, shapes=((3, 9), (2, 6)), vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    """Random token batches with left padding on the first row and labels on the last 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, length in shapes:
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        ids[0, :2] = 0
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


FORGET, RETAIN = make_batches(0), make_batches(1)


def independent_attribution(model, batches) -> dict[int, torch.Tensor]:
    """From transformers' own router outputs: top-k weights scattered to [tokens, E], the mean over
    each sequence's attended tokens, then over sequences."""
    family = moe_family(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in moe_layers(model):
        def hook(module, args, output, layer=layer):
            _, weights, index = output
            dense = torch.zeros(index.shape[0], module.weight.shape[0], dtype=torch.float64)
            captured[layer] = dense.scatter_add_(1, index, weights.double())
        handles.append(getattr(block, family.router).register_forward_hook(hook))
    totals: dict[int, torch.Tensor] = {}
    sequences = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"]
                for layer, gates in captured.items():
                    per_token = gates.reshape(*mask.shape, -1)
                    per_seq = (per_token * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                    totals[layer] = totals.get(layer, 0) + per_seq.sum(0)
                sequences += mask.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {layer: t / sequences for layer, t in totals.items()}


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_attribution_matches_transformers_router_outputs(family):
    model = tiny_moe(family, num_layers=3, num_experts=4, top_k=2)
    got = attribute_experts(model, FORGET)
    want = independent_attribution(model, FORGET)
    assert sorted(got.scores) == sorted(want) == [layer for layer, _ in moe_layers(model)]
    for layer in want:
        torch.testing.assert_close(got.scores[layer], want[layer], rtol=1e-5, atol=1e-6)
    assert got.sequences == 5 and got.tokens == int(sum(b["attention_mask"].sum() for b in FORGET))
    layer, expert = got.top()
    assert got.scores[layer][expert] == max(float(s.max()) for s in got.scores.values())
    assert "rank  layer  expert" in got.table()


def changed_parameters(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> boolean mask of changed entries, for every parameter that changed at all."""
    old = dict(before.named_parameters())
    return {n: p.detach() != old[n].detach() for n, p in after.named_parameters()
            if not torch.equal(p.detach(), old[n].detach())}


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("objective", ["ga", "npo"])
def test_only_the_target_expert_and_its_router_change(family, objective):
    model = tiny_moe(family, num_layers=3, num_experts=4, top_k=2)
    original = copy.deepcopy(model)
    out = UOE(objective=objective, steps=3, lr=1e-2, batch_size=2).unlearn(model, FORGET, RETAIN, progress=False)
    layer, expert = out.target
    assert (layer, expert) == attribute_experts(original, FORGET).top()
    assert not changed_parameters(original, model)  # the caller's model is untouched
    changed = changed_parameters(original, out.model)
    prefix = f"model.layers.{layer}.mlp."
    router = f"{prefix}{MOE_FAMILIES[family].router}.weight"
    assert set(changed) <= {router, f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"}
    assert router in changed and f"{prefix}experts.down_proj" in changed
    for name in (f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"):
        if name in changed:  # every other expert's slice is bitwise unchanged
            others = torch.cat([changed[name][:expert], changed[name][expert + 1:]])
            assert not others.any()
    block = dict(moe_layers(out.model))[layer]
    e, i2, h = block.experts.gate_up_proj.shape
    assert out.trained_parameters == i2 * h + block.experts.down_proj[0].numel() + block.gate.weight.numel()
    assert len(out.history) == 3 and all("anchor" in r for r in out.history)


def test_prefix_cache_does_not_change_the_result():
    model = tiny_moe("qwen3_moe", num_layers=4)
    runs = [UOE(objective="gdiff", steps=3, lr=1e-2, batch_size=2, target=(2, 1), prefix_cache=cache)
            .unlearn(model, FORGET, RETAIN, progress=False) for cache in (True, False)]
    for (n, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for ra, rb in zip(runs[0].history, runs[1].history):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_anchor_keeps_forget_tokens_on_the_target_expert():
    model = tiny_moe("mixtral", num_layers=2)
    # With a zero-weight objective, only the anchor moves the router: its loss falls.
    out = UOE(objective=GradDiff(gamma=0.0), anchor_weight=1.0, steps=15, lr=5e-2,
              batch_size=8, target=(1, 3)).unlearn(model, FORGET[:1], RETAIN, progress=False)
    anchors = [r["anchor"] for r in out.history]
    assert anchors[-1] < 0.8 * anchors[0]


def test_rmu_uses_the_target_layer():
    model = tiny_moe("olmoe", num_layers=3)
    uoe = UOE(objective="rmu", steps=2, batch_size=2, target=(2, 0))
    assert uoe._objective(2).layer == 2  # by name, RMU reads the target layer
    out = UOE(objective=RMU(layer=2, steering_coeff=2.0, alpha=1.0), steps=2, batch_size=2,
              target=(2, 0)).unlearn(model, FORGET, RETAIN, progress=False)
    assert len(out.history) == 2
    with pytest.raises(ValueError, match="lies below the target layer"):
        UOE(objective=RMU(layer=0), target=(2, 0)).unlearn(model, FORGET, RETAIN, progress=False)


def test_dense_model_is_rejected():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="not a registered MoE family"):
        UOE().unlearn(dense, FORGET, RETAIN, progress=False)


def test_bad_targets_and_settings_are_rejected():
    model = tiny_moe("deepseek_v3", num_layers=3)
    with pytest.raises(ValueError, match="not a routed expert"):
        UOE(target=(0, 0)).unlearn(model, FORGET, RETAIN, progress=False)  # layer 0 is DeepSeek's dense layer
    with pytest.raises(ValueError, match="not a routed expert"):
        UOE(target=(1, 9)).unlearn(model, FORGET, RETAIN, progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        UOE(objective="po")
    with pytest.raises(ValueError, match="lr must be"):
        UOE(lr=-1.0)
    with pytest.raises(ValueError, match="forget set is empty"):
        UOE().unlearn(model, [], RETAIN, progress=False)


def test_divergence_stops_and_leaves_an_inplace_model_as_it_was(monkeypatch):
    model = tiny_moe("mixtral", num_layers=2)
    original = copy.deepcopy(model)
    uoe = UOE(objective="ga", steps=5, lr=1e-2, batch_size=2, target=(1, 0))
    calls = {"n": 0}
    real_loss = type(uoe._objective(1)).loss

    def loss(self, model, forget_batch, retain_batch=None):
        calls["n"] += 1
        value, logs = real_loss(self, model, forget_batch, retain_batch)
        return (value * float("nan") if calls["n"] == 3 else value), logs

    monkeypatch.setattr(type(uoe._objective(1)), "loss", loss)
    with pytest.raises(FloatingPointError, match="at step 3"):
        uoe.unlearn(model, FORGET, RETAIN, inplace=True, progress=False)
    assert not changed_parameters(original, model)
    assert all(p.grad is None for p in model.parameters())


def test_callback_may_run_the_model_on_other_data():
    model = tiny_moe("mixtral", num_layers=3)
    other = make_batches(7)
    seen = []

    def callback(step, m, record):
        with torch.no_grad():
            seen.append(m(input_ids=other[0]["input_ids"], attention_mask=other[0]["attention_mask"]).logits.sum())

    UOE(objective="ga", steps=2, batch_size=2, target=(2, 0)).unlearn(model, FORGET, RETAIN, progress=False,
                                                                      callback=callback)
    assert len(seen) == 2 and all(torch.isfinite(v) for v in seen)


# --- checkpoints and interrupts ---------------------------------------------------------------


def interrupt_at(step_to_stop):
    def callback(step, model, record):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return callback


# Three forget and two retain batches: the interrupt falls inside a later pass over each, so the
# data order, its positions and the generator all have to be resumed.
CKPT_FORGET = make_batches(2, shapes=((2, 9), (3, 7), (2, 8)))
CKPT_RETAIN = make_batches(3, shapes=((2, 8), (3, 6)))


@pytest.mark.parametrize("objective", ["ga", "npo", "gdiff"])
@pytest.mark.parametrize("inplace", [False, True])
def test_an_interrupted_run_resumes_to_bitwise_the_uninterrupted_parameters(tmp_path, monkeypatch, objective,
                                                                             inplace):
    uoe = UOE(objective=objective, steps=9, lr=1e-2)  # the target is attributed
    straight = uoe.unlearn(tiny_moe("qwen3_moe", num_layers=3), CKPT_FORGET, CKPT_RETAIN, progress=False)

    model = tiny_moe("qwen3_moe", num_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        uoe.unlearn(model, CKPT_FORGET, CKPT_RETAIN, inplace=inplace, progress=False, callback=interrupt_at(7),
                    checkpoint_dir=tmp_path, checkpoint_every=4)
    for k, v in model.state_dict().items():  # the interrupt left the user's model as it was
        assert torch.equal(v, before[k]), k
    assert torch.load(tmp_path / "uoe_checkpoint.pt", weights_only=True)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["uoe_checkpoint.pt"]  # no temporary file left behind

    def no_attribution(*args, **kwargs):
        raise AssertionError("a resume must use the checkpoint's target, not attribute again")

    monkeypatch.setattr("unlearn_fast.methods.uoe.attribute_experts", no_attribution)
    resumed = uoe.unlearn(model, CKPT_FORGET, CKPT_RETAIN, inplace=inplace, progress=False, checkpoint_dir=tmp_path,
                          checkpoint_every=4)
    assert resumed.target == straight.target
    assert all(torch.equal(resumed.attribution.scores[k], v) for k, v in straight.attribution.scores.items())
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    untimed = [[{k: v for k, v in r.items() if k != "time_s"} for r in run.history] for run in (resumed, straight)]
    assert untimed[0] == untimed[1]
    assert torch.load(tmp_path / "uoe_checkpoint.pt", weights_only=True)["step"] == 9


def test_a_finished_run_continues_when_steps_are_raised(tmp_path):
    straight = UOE(objective="gdiff", steps=8, lr=1e-2, target=(1, 2)).unlearn(
        tiny_moe("mixtral", num_layers=3), CKPT_FORGET, CKPT_RETAIN, progress=False)
    UOE(objective="gdiff", steps=5, lr=1e-2, target=(1, 2)).unlearn(
        tiny_moe("mixtral", num_layers=3), CKPT_FORGET, CKPT_RETAIN, progress=False, checkpoint_dir=tmp_path)
    longer = UOE(objective="gdiff", steps=8, lr=1e-2, target=(1, 2)).unlearn(
        tiny_moe("mixtral", num_layers=3), CKPT_FORGET, CKPT_RETAIN, progress=False, checkpoint_dir=tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), longer.model.parameters()))
    assert len(longer.history) == 8


@pytest.mark.parametrize("change,message", [
    (dict(lr=2e-2), "setting lr"),
    (dict(target=(2, 0)), "setting target"),
    (dict(model_seed=1), "different model"),
    (dict(forget_seed=5), "different data"),
    (dict(steps=2), "past steps=2"),
])
def test_resuming_another_run_is_an_error(tmp_path, change, message):
    settings = dict(objective="ga", lr=1e-2, steps=4)
    UOE(**settings).unlearn(tiny_moe("mixtral", num_layers=3), CKPT_FORGET, progress=False, checkpoint_dir=tmp_path)
    model = tiny_moe("mixtral", num_layers=3, seed=change.pop("model_seed", 0))
    forget = make_batches(change.pop("forget_seed", 2), shapes=((2, 9), (3, 7), (2, 8)))
    with pytest.raises(ValueError, match=message):
        UOE(**{**settings, **change}).unlearn(model, forget, progress=False, checkpoint_dir=tmp_path)


def test_a_checkpoint_target_this_model_lacks_is_an_error(tmp_path):
    uoe = UOE(objective="ga", lr=1e-2, steps=2)
    written = uoe.unlearn(tiny_moe("mixtral", num_layers=3, num_experts=8), CKPT_FORGET, progress=False,
                          checkpoint_dir=tmp_path)
    assert written.target[1] >= 4  # an expert the 4-expert model below does not have
    layer, expert = written.target
    with pytest.raises(ValueError, match=rf"uoe_checkpoint.pt's target \(layer {layer}, expert {expert}\) is not a rou"):
        uoe.unlearn(tiny_moe("mixtral", num_layers=3, num_experts=4), CKPT_FORGET, progress=False,
                    checkpoint_dir=tmp_path)


def test_checkpoint_every_is_checked():
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got 0"):
        UOE(target=(1, 0)).unlearn(tiny_moe("mixtral"), FORGET, progress=False, checkpoint_every=0)
