"""SOUL end to end on a tiny random Llama: every optimizer and estimator, safety of the user's model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast import SOUL, SOULConfig
from unlearn_fast.evaluate import sequence_logprobs


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def batches(n, seed, batch_size=4, length=12, prompt=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (batch_size, length), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def forget_nll(model, data):
    with torch.no_grad():
        scores = [sequence_logprobs(model, b) for b in data]
    return -sum(s.sum_logp.sum() for s in scores).item() / sum(s.n_tokens.sum() for s in scores).item()


@pytest.mark.parametrize("objective", ["ga", "gdiff", "npo"])
@pytest.mark.parametrize(
    "optimizer,estimator",
    [
        ("sophia", "gnb"),
        ("sophia", "empirical"),
        ("sophia", "hutchinson"),
        ("adamw", "gnb"),
        ("soul_reference", "gnb"),
    ],
)
def test_unlearning_raises_forget_loss_and_keeps_the_input_model(objective, optimizer, estimator):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forget, retain = batches(2, seed=1), batches(2, seed=2)
    lr = 1e-2 if optimizer != "soul_reference" else 1e-2
    soul = SOUL(
        objective=objective,
        optimizer=optimizer,
        estimator=estimator,
        lr=lr,
        steps=12,
        hessian_interval=3,
        max_grad_norm=None,
    )
    result = soul.unlearn(model, forget, retain, progress=False)
    assert len(result.history) == 12
    assert forget_nll(result.model, forget) > forget_nll(model, forget) + 0.05
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    assert result.model is not model


def test_only_trainable_parameters_move():
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1.mlp" in name)
    result = SOUL(objective="ga", lr=1e-2, steps=3).unlearn(model, batches(1, 1), progress=False)
    for (name, p), q in zip(model.named_parameters(), result.model.parameters()):
        assert torch.equal(p, q) != ("layers.1.mlp" in name), name


def test_divergence_stops_naming_the_step_and_restores_inplace_model(monkeypatch):
    from unlearn_fast.objectives import GradientAscent

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_loss = GradientAscent.loss
    calls = {"n": 0}

    def flaky_loss(self, model, forget_batch, retain_batch=None):
        calls["n"] += 1
        loss, logs = real_loss(self, model, forget_batch, retain_batch)
        return (loss * float("nan") if calls["n"] == 4 else loss), logs

    monkeypatch.setattr(GradientAscent, "loss", flaky_loss)
    with pytest.raises(FloatingPointError, match="step 4"):
        SOUL(objective="ga", lr=1e-2, steps=10).unlearn(model, batches(2, 1), inplace=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_inputs_have_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="lr must be"):
        SOULConfig(lr=-1.0)
    with pytest.raises(ValueError, match="optimizer must be"):
        SOUL(optimizer="sgd")
    with pytest.raises(ValueError, match="needs retain data"):
        SOUL(objective="gdiff").unlearn(model, batches(1, 1), [], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        SOUL(objective="ga").unlearn(model, [("q", "a")], progress=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        SOUL().unlearn("not a model", batches(1, 1), progress=False)
    frozen = tiny_llama()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SOUL(objective="ga").unlearn(frozen, batches(1, 1), progress=False)


@pytest.mark.slow
def test_soul_on_smollm2_lora_unlearns_a_fact():
    """End to end on the real SmolLM2-135M with a LoRA adapter and the generated facts."""
    from peft import LoraConfig, get_peft_model

    from unlearn_fast.data import make_facts_dataset
    from unlearn_fast.models import load_smollm2

    base, tokenizer = load_smollm2()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["down_proj"], layers_to_transform=[28, 29]))
    data = make_facts_dataset(num_people=10, questions_per_person=4, forget_percent=10, seed=0)
    forget, retain = data.forget[:4], data.retain[:4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = SOUL(objective="gdiff", lr=1e-2, steps=4, batch_size=4, hessian_interval=2).unlearn(
        model, forget, retain, tokenizer=tokenizer, progress=False
    )
    from unlearn_fast.data import collate, encode_qa, pad_token_id_of

    batch = collate([encode_qa(tokenizer, e) for e in forget], pad_token_id_of(tokenizer))
    assert forget_nll(result.model, [batch]) > forget_nll(model, [batch]) + 0.1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the input is untouched
    moved = [n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)


# --- checkpoints and interrupts ---------------------------------------------------------------


def interrupt_at(step_to_stop):
    def callback(step, model, record):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize(
    "objective,optimizer,estimator",
    [
        ("gdiff", "sophia", "gnb"),
        ("npo", "sophia", "hutchinson"),
        ("gdiff", "adamw", "gnb"),
        ("ga", "soul_reference", "gnb"),
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_an_interrupted_run_resumes_to_bitwise_the_uninterrupted_parameters(
    tmp_path, objective, optimizer, estimator, inplace
):
    forget, retain = batches(3, seed=1), batches(2, seed=2)  # several passes: the data order is resumed
    soul = SOUL(objective=objective, optimizer=optimizer, estimator=estimator, lr=1e-2, steps=9, hessian_interval=2)
    straight = soul.unlearn(tiny_llama(), forget, retain, progress=False)

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        soul.unlearn(
            model,
            forget,
            retain,
            inplace=inplace,
            progress=False,
            callback=interrupt_at(7),
            checkpoint_dir=tmp_path,
            checkpoint_every=4,
        )
    for k, v in model.state_dict().items():  # the interrupt left the user's model as it was
        assert torch.equal(v, before[k]), k
    # At step 4 the forget stream is inside its second pass over 3 batches.
    assert torch.load(tmp_path / "soul_checkpoint.pt", weights_only=True)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["soul_checkpoint.pt"]  # no temporary file left behind

    resumed = soul.unlearn(
        model, forget, retain, inplace=inplace, progress=False, checkpoint_dir=tmp_path, checkpoint_every=4
    )
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert torch.load(tmp_path / "soul_checkpoint.pt", weights_only=True)["step"] == 9


def test_a_finished_run_continues_when_steps_are_raised(tmp_path):
    forget, retain = batches(3, seed=1), batches(2, seed=2)
    straight = SOUL(objective="gdiff", lr=1e-2, steps=8, hessian_interval=3).unlearn(
        tiny_llama(), forget, retain, progress=False
    )
    SOUL(objective="gdiff", lr=1e-2, steps=5, hessian_interval=3).unlearn(
        tiny_llama(), forget, retain, progress=False, checkpoint_dir=tmp_path, checkpoint_every=100
    )
    longer = SOUL(objective="gdiff", lr=1e-2, steps=8, hessian_interval=3).unlearn(
        tiny_llama(), forget, retain, progress=False, checkpoint_dir=tmp_path
    )
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), longer.model.parameters()))
    assert len(longer.history) == 8


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(lr=2e-2), "setting lr"),
        (dict(seed=1), "setting seed"),
        (dict(model_seed=1), "model"),
        (dict(forget_seed=5), "data"),
        (dict(steps=2), "past steps=2"),
    ],
)
def test_resuming_another_run_is_an_error(tmp_path, change, message):
    settings = dict(objective="ga", lr=1e-2, steps=4)
    SOUL(**settings).unlearn(tiny_llama(), batches(2, 1), progress=False, checkpoint_dir=tmp_path)
    model = tiny_llama(change.pop("model_seed", 0))
    forget = batches(2, change.pop("forget_seed", 1))
    with pytest.raises(ValueError, match=message):
        SOUL(**{**settings, **change}).unlearn(model, forget, progress=False, checkpoint_dir=tmp_path)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from unlearn_fast import checkpoint

    path = checkpoint.atomic_save({"step": 1}, tmp_path / "c.pt")
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"step": 2}, path)
    assert checkpoint.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_non_finite_gradient_stops_naming_the_step(monkeypatch):
    from unlearn_fast.objectives import GradientAscent

    real_loss = GradientAscent.loss
    calls = {"n": 0}

    def loss_with_nan_gradient(self, model, forget_batch, retain_batch=None):
        calls["n"] += 1
        loss, logs = real_loss(self, model, forget_batch, retain_batch)
        if calls["n"] == 3:  # sqrt at 0 is finite, its derivative is not: a finite loss, a NaN gradient
            loss = loss + torch.sqrt(next(model.parameters()).abs() * 0).sum()
        return loss, logs

    monkeypatch.setattr(GradientAscent, "loss", loss_with_nan_gradient)
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 3"):
        SOUL(objective="ga", lr=1e-2, steps=5).unlearn(tiny_llama(), batches(2, 1), progress=False)
