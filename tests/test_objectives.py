"""Unlearning objectives against direct computations with full logits (log_softmax) or
output_hidden_states on tiny random Llama models, plus their caches and argument checks."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unlearn_fast.data import collate, encode_qa
from unlearn_fast.objectives import (
    NPO,
    RMU,
    Objective,
    Refusal,
    make_objective,
    sequence_keys,
)

VOCAB = 64


def tiny_llama(vocab_size=VOCAB, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def encoded_examples(n, seed, vocab_size=VOCAB):
    """``n`` random (prompt, answer) sequences of various lengths, labels on the answer only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt_len, answer_len = (int(x) for x in torch.randint(2, 6, (2,), generator=g))
        ids = torch.randint(3, vocab_size, (prompt_len + answer_len,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return out


def make_batch(n=3, seed=0):
    return collate(encoded_examples(n, seed), pad_token_id=0)


def perturb(model, scale=0.05, seed=1):
    """Move the weights away from the ones prepare() saw, so the cached terms are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def direct_token_logp(model, batch):
    """The specification: full logits, log_softmax, gathered on the shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    gathered = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, gathered, torch.zeros_like(gathered)), scored


def direct_ce(model, batch):
    token_logp, scored = direct_token_logp(model, batch)
    return -token_logp.sum() / scored.sum()


def direct_layer_output(model, batch, layer):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer + 1]  # [0] is the embeddings


def masked_mse(h, target, mask):
    per_token = ((h - target) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum()


def assert_same_value_and_grads(got, expected, params):
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-9, atol=1e-10)
    for g, e in zip(torch.autograd.grad(got, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# A tiny word-level tokenizer (PO needs one), with and without a chat template

WORDS = (
    "Question Answer : ? . , ' USER BOT Where was Ada born What does Bo do Who is Cy "
    "Lisbon baker poet I don t know m not sure have no idea"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}USER {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} BOT{% endif %}"
)


def tiny_tokenizer(chat_template=None):
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


QA = [("Where was Ada born?", "Lisbon."), ("What does Bo do?", "Bo is a baker."), ("Who is Cy?", "A poet.")]
REFUSALS = ("I don't know.", "I'm not sure.", "I have no idea.")


# ---------------------------------------------------------------------------------------------
# Likelihood objectives against log_softmax


@pytest.mark.parametrize("name,kwargs", [("ga", {}), ("gdiff", {}), ("gdiff", {"gamma": 0.7})])
def test_ga_and_gdiff_match_log_softmax(name, kwargs):
    model = tiny_llama()
    forget, retain = make_batch(seed=0), make_batch(n=2, seed=1)
    objective = make_objective(name, **kwargs)
    objective.prepare(model, [forget], [retain])
    loss, logs = objective.loss(model, forget, retain)

    expected = -direct_ce(model, forget)
    if name == "gdiff":
        expected = expected + kwargs.get("gamma", 1.0) * direct_ce(model, retain)
        assert logs["retain_ce"] == pytest.approx(direct_ce(model, retain).item(), rel=1e-9)
    assert logs["forget_ce"] == pytest.approx(direct_ce(model, forget).item(), rel=1e-9)
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert_same_value_and_grads(loss, expected, list(model.parameters()))


def test_npo_matches_log_softmax_against_the_initial_model():
    model = tiny_llama()
    forget, retain = make_batch(seed=0), make_batch(n=2, seed=1)
    with torch.no_grad():
        reference = direct_token_logp(model, forget)[0].sum(-1)
    npo = make_objective("npo", beta=0.5, gamma=0.3)
    npo.prepare(model, [forget], [retain])
    perturb(model)
    loss, logs = npo.loss(model, forget, retain)

    log_ratio = direct_token_logp(model, forget)[0].sum(-1) - reference
    forget_term = -(2 / 0.5) * F.logsigmoid(-0.5 * log_ratio).mean()
    assert logs["forget_npo"] == pytest.approx(forget_term.item(), rel=1e-9)
    assert logs["log_ratio"] == pytest.approx(log_ratio.mean().item(), rel=1e-9)
    assert_same_value_and_grads(loss, forget_term + 0.3 * direct_ce(model, retain), list(model.parameters()))


def test_npo_reference_is_cached_per_sequence_once():
    model = tiny_llama()
    examples = encoded_examples(5, seed=3)
    batches = [collate(examples[:3], 0), collate(examples[3:], 0)]
    expected = torch.cat([direct_token_logp(model, b)[0].sum(-1) for b in batches]).detach()
    npo = NPO(beta=0.1)
    npo.prepare(model, batches)
    cached = torch.cat([npo.reference_logprobs(b) for b in batches])
    torch.testing.assert_close(cached, expected, rtol=1e-10, atol=1e-10)

    # At step 0 p = p_ref: the forget term is (2/beta) log 2.
    _, logs = npo.loss(model, batches[0], make_batch(seed=9))
    assert logs["forget_npo"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-9)

    # Regrouped and padded differently, after the model changed: still the initial model's values.
    perturb(model)
    regrouped = collate([examples[4], examples[0], examples[2]], 0)
    torch.testing.assert_close(npo.reference_logprobs(regrouped), expected[[4, 0, 2]], rtol=1e-10, atol=1e-10)
    _, logs = npo.loss(model, regrouped, make_batch(seed=9))
    assert logs["forget_npo"] != pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)


def test_npo_rejects_unprepared_use_and_unseen_sequences():
    model, forget = tiny_llama(), make_batch()
    npo = NPO()
    with pytest.raises(RuntimeError, match="prepare"):
        npo.loss(model, forget, forget)
    npo.prepare(model, [forget])
    with pytest.raises(ValueError, match="not seen by prepare"):
        npo.loss(model, make_batch(seed=5), forget)
    with pytest.raises(ValueError, match="no forget batches"):
        NPO().prepare(model, [])


def test_sequence_keys_ignore_padding_and_batch_grouping():
    examples = encoded_examples(4, seed=0)
    alone = [sequence_keys(collate([e], 0))[0] for e in examples]
    assert sequence_keys(collate(examples, 0)) == alone
    assert sequence_keys(collate(examples[::-1], pad_token_id=7)) == alone[::-1]
    assert len(set(alone)) == 4


# ---------------------------------------------------------------------------------------------
# PO (refusal)


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_refusal_batches_keep_the_prompt_and_label_only_the_refusal(chat_template):
    tokenizer = tiny_tokenizer(chat_template)
    forget = collate([encode_qa(tokenizer, qa) for qa in QA], tokenizer.pad_token_id)
    po = Refusal(tokenizer, refusals=REFUSALS)
    batch = po.refusal_batch(forget)

    rows = []
    for row, (question, _) in enumerate(QA):
        # Each row is exactly the training encoding of (question, one of the refusals).
        candidates = [encode_qa(tokenizer, (question, r)) for r in REFUSALS]
        n = int(batch["attention_mask"][row].sum())
        match = [c for c in candidates if c["input_ids"] == batch["input_ids"][row, :n].tolist()]
        assert len(match) == 1
        assert batch["labels"][row, :n].tolist() == match[0]["labels"]
        assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert batch["labels"][row, -1 if n == batch["input_ids"].shape[1] else n - 1] == tokenizer.eos_token_id
        rows.append(match[0])
    torch.testing.assert_close(batch, collate(rows, tokenizer.pad_token_id))
    # The choice is a function of the sequence: the same batch gives the same refusals.
    torch.testing.assert_close(po.refusal_batch(forget), batch)


def test_po_matches_log_softmax():
    tokenizer = tiny_tokenizer(CHAT_TEMPLATE)
    model = tiny_llama(vocab_size=len(tokenizer))
    forget = collate([encode_qa(tokenizer, qa) for qa in QA], tokenizer.pad_token_id)
    retain = collate([encode_qa(tokenizer, ("Who is Ada?", "A baker."))], tokenizer.pad_token_id)
    po = make_objective("po", tokenizer=tokenizer, refusals=REFUSALS, gamma=2.0)
    loss, logs = po.loss(model, forget, retain)
    refusal_ce = direct_ce(model, po.refusal_batch(forget))
    assert logs["refusal_ce"] == pytest.approx(refusal_ce.item(), rel=1e-9)
    assert_same_value_and_grads(loss, refusal_ce + 2.0 * direct_ce(model, retain), list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# RMU


def test_rmu_matches_hidden_states_and_skips_later_layers():
    model = tiny_llama()
    forget, retain = make_batch(seed=0), make_batch(n=2, seed=1)
    rmu = RMU(layer=0, steering_coeff=3.0, alpha=2.0)
    rmu.prepare(model, [forget], [retain])
    with torch.no_grad():
        frozen = direct_layer_output(model, retain, 0)
    perturb(model)

    calls = []
    hook = model.model.layers[1].register_forward_hook(lambda *args: calls.append(1))
    loss, logs = rmu.loss(model, forget, retain)
    hook.remove()
    assert calls == []  # the forward stopped after layer 0

    u = rmu.direction.double()
    forget_term = masked_mse(direct_layer_output(model, forget, 0), 3.0 * u, forget["attention_mask"])
    retain_term = masked_mse(direct_layer_output(model, retain, 0), frozen, retain["attention_mask"])
    assert logs["forget_rmu"] == pytest.approx(forget_term.item(), rel=1e-9)
    assert logs["retain_rmu"] == pytest.approx(retain_term.item(), rel=1e-9)
    params = [*model.model.embed_tokens.parameters(), *model.model.layers[0].parameters()]
    assert_same_value_and_grads(loss, forget_term + 2.0 * retain_term, params)


def test_rmu_direction_and_frozen_activations_stay_fixed():
    model = tiny_llama(dtype=torch.float32)
    forget, retain = make_batch(seed=0), make_batch(n=2, seed=1)
    rmu = RMU(layer=0, seed=4)
    rmu.prepare(model, [forget], [retain])
    u = rmu.direction.clone()
    assert u.shape == (32,) and float(u.norm()) == pytest.approx(1.0, rel=1e-6) and (u >= 0).all()
    with torch.no_grad():
        initial = direct_layer_output(model, retain, 0) * retain["attention_mask"].unsqueeze(-1)
    torch.testing.assert_close(rmu.frozen_activations(retain), initial, rtol=1e-5, atol=1e-6)

    _, logs = rmu.loss(model, forget, retain)
    assert logs["retain_rmu"] == pytest.approx(0.0, abs=1e-10)  # unchanged model, same activations
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        rmu.loss(model, forget, retain)[0].backward()
        optimizer.step()
    _, logs = rmu.loss(model, forget, retain)
    assert logs["retain_rmu"] > 0
    torch.testing.assert_close(rmu.direction, u, rtol=0, atol=0)
    torch.testing.assert_close(rmu.frozen_activations(retain), initial, rtol=1e-5, atol=1e-6)

    again = RMU(layer=0, seed=4)
    again.prepare(tiny_llama(seed=8), [], [retain])
    torch.testing.assert_close(again.direction, u, rtol=0, atol=0)  # the seed fixes u


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_rmu_early_exit_under_gradient_checkpointing(reentrant):
    # The backward pass recomputes the checkpointed layer after the hook is gone.
    forget, retain = make_batch(seed=0), make_batch(n=2, seed=1)
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        rmu = RMU(layer=0)
        rmu.prepare(model, [forget], [retain])
        perturb(model)
        rmu.loss(model, forget, retain)[0].backward()  # reentrant checkpointing needs backward()
        grads.append([p.grad for p in model.model.layers[0].parameters()])
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e)


def test_rmu_refuses_activations_computed_without_gradients():
    # transformers 4.x runs a checkpointed layer's hooks inside torch.utils.checkpoint; with
    # use_reentrant=True that is under no_grad, and the activation would get no gradient.
    model = tiny_llama()
    layer = model.model.layers[0]

    class HooksInsideReentrantCheckpoint(type(layer)):
        def __call__(self, *args, **kwargs):
            call = functools.partial(super().__call__, **kwargs)
            return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=True)

    layer.__class__ = HooksInsideReentrantCheckpoint
    rmu = RMU(layer=0, alpha=0)
    rmu.prepare(model, [])
    with pytest.raises(RuntimeError, match="use_reentrant"):
        rmu.loss(model, make_batch())


def test_rmu_checks_its_layer_and_retain_data():
    model, batch = tiny_llama(), make_batch()
    with pytest.raises(ValueError, match="layer 2 is out of range: the model has 2 decoder layers"):
        RMU(layer=2).prepare(model, [batch], [batch])
    with pytest.raises(ValueError, match="needs retain batches"):
        RMU(layer=0).prepare(model, [batch], [])
    with pytest.raises(RuntimeError, match="prepare"):
        RMU(layer=0).loss(model, batch, batch)
    rmu = RMU(layer=0, alpha=0)
    rmu.prepare(model, [batch])
    assert not rmu.needs_retain and set(rmu.loss(model, batch)[1]) == {"loss", "forget_rmu"}


# ---------------------------------------------------------------------------------------------
# Behaviour shared by all objectives


def all_objectives(tokenizer):
    return [
        make_objective("ga"),
        make_objective("gdiff"),
        make_objective("npo"),
        make_objective("po", tokenizer=tokenizer),
        make_objective("rmu", layer=1),
    ]


def test_no_objective_calls_the_lm_head_module(monkeypatch):
    # The fused op reads the head's weight; calling the module would build [B, S, V] logits.
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), dtype=torch.float32)
    forget = collate([encode_qa(tokenizer, qa) for qa in QA], tokenizer.pad_token_id)

    def forbidden(*args, **kwargs):
        raise AssertionError("the LM head module was called")

    monkeypatch.setattr(model.lm_head, "forward", forbidden)
    for objective in all_objectives(tokenizer):
        assert isinstance(objective, Objective)
        objective.prepare(model, [forget], [forget])
        loss, logs = objective.loss(model, forget, forget)
        loss.backward()
        assert math.isfinite(logs["loss"]) and logs["loss"] == pytest.approx(loss.item())


def test_gradient_descent_on_ga_increases_forget_ce():
    model = tiny_llama(dtype=torch.float32)
    forget = make_batch(n=4, seed=0)
    ga = make_objective("ga")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ces = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, logs = ga.loss(model, forget)
        loss.backward()
        optimizer.step()
        ces.append(logs["forget_ce"])
    ces.append(ga.loss(model, forget)[1]["forget_ce"])
    assert all(b > a for a, b in zip(ces, ces[1:])), ces


def test_retain_term_is_required_unless_its_weight_is_zero():
    model, forget = tiny_llama(), make_batch()
    with pytest.raises(ValueError, match="needs a retain batch"):
        make_objective("gdiff").loss(model, forget)
    gdiff = make_objective("gdiff", gamma=0)
    assert not gdiff.needs_retain
    loss, logs = gdiff.loss(model, forget)
    assert set(logs) == {"loss", "forget_ce"}
    torch.testing.assert_close(loss, make_objective("ga").loss(model, forget)[0])


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("npo", {"beta": 0}, "beta .* > 0, got 0"),
        ("npo", {"beta": -0.1}, "beta .* > 0"),
        ("npo", {"beta": float("nan")}, "beta .* finite"),
        ("npo", {"gamma": -1}, "gamma .* >= 0, got -1"),
        ("gdiff", {"gamma": float("inf")}, "gamma .* finite"),
        ("gdiff", {"gamma": "1"}, "gamma"),
        ("po", {"refusals": []}, "refusals must be a non-empty list"),
        ("po", {"refusals": ["I don't know.", " "]}, "non-empty strings"),
        ("po", {"gamma": -0.5}, "gamma"),
        ("rmu", {"layer": -1}, "layer must be a decoder layer index >= 0"),
        ("rmu", {"layer": 1.5}, "layer"),
        ("rmu", {"steering_coeff": 0}, "steering_coeff .* > 0"),
        ("rmu", {"alpha": -1}, "alpha .* >= 0"),
    ],
)
def test_invalid_hyperparameters_are_clear_value_errors(name, kwargs, message):
    if name == "po":
        kwargs = {"tokenizer": tiny_tokenizer(), **kwargs}
    with pytest.raises(ValueError, match=message):
        make_objective(name, **kwargs)


def test_factory_names_and_arguments():
    with pytest.raises(
        ValueError, match=r"unknown objective 'sgd'; choose one of \['ga', 'gdiff', 'npo', 'po', 'rmu'\]"
    ):
        make_objective("sgd")
    with pytest.raises(TypeError, match=r"objective 'ga' takes no argument \['gamma'\]"):
        make_objective("ga", gamma=1.0)
    unbound = make_objective("po")  # the method binds its tokenizer; used without one: a clear error
    with pytest.raises(ValueError, match="'po' needs a tokenizer"):
        unbound.refusal_batch(
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long)}
        )
    npo = make_objective("npo")
    assert (npo.beta, npo.gamma) == (0.1, 1.0)
    rmu = make_objective("rmu")
    assert (rmu.layer, rmu.steering_coeff, rmu.alpha) == (7, 6.5, 100.0)
