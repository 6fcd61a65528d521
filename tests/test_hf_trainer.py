"""UnlearningTrainer: SOUL's objectives and Sophia through transformers.Trainer, on a tiny random Llama."""

import copy

import pytest
import torch
from test_soul import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainingArguments

from unlearn_fast.evaluate import sequence_logprobs
from unlearn_fast.hf_trainer import UnlearningTrainer
from unlearn_fast.objectives import NPO, GradDiff
from unlearn_fast.optim import Sophia
from unlearn_fast.training import sampled_label_cross_entropy

WORDS = "Question Answer : ? . Where was Ada Bo Cy Di born What does do Who is Lisbon Paris Rome baker poet a".split()
FORGET = [
    ("Where was Ada born?", "Lisbon."),
    ("What does Bo do?", "Bo is a baker."),
    ("Who is Cy?", "A poet."),
    ("Where was Di born?", "Rome."),
]
RETAIN = [("Where was Bo born?", "Paris."), ("What does Ada do?", "Ada is a poet."), ("Who is Di?", "A baker.")]


def tiny_tokenizer():
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def trainer_for(tmp_path, model, objective="gdiff", args=None, **kwargs):
    kwargs = {"forget_dataset": FORGET, "retain_dataset": RETAIN, **kwargs}
    return UnlearningTrainer(
        model=model,
        args=args or training_args(tmp_path),
        processing_class=tiny_tokenizer(),
        objective=objective,
        **kwargs,
    )


def forget_logprob(model, batches):
    with torch.no_grad():
        return sum(sequence_logprobs(model, b).sum_logp.sum().item() for b in batches)


def test_graddiff_with_sophia_moves_the_trainable_parameters_and_unlearns(tmp_path):
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("layers." in name)  # embeddings and head frozen: they must not move
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, learning_rate=3e-3)
    trainer = trainer_for(tmp_path, model, GradDiff(), args=args, sophia={"hessian_interval": 2})
    initial = forget_logprob(model, trainer.forget_batches)
    trainer.train()

    assert trainer.state.global_step == 3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name
    assert forget_logprob(model, trainer.forget_batches) < initial - 0.5
    sophia = trainer.optimizer.optimizer  # accelerate's wrapper around the Sophia the trainer built
    assert isinstance(sophia, Sophia)
    hessians = [sophia.state[p]["hessian"] for g in sophia.param_groups for p in g["params"]]
    assert any(h.abs().sum() > 0 for h in hessians)  # refreshed after step 2
    assert not sophia._optimizer_step_pre_hooks and not sophia._optimizer_step_post_hooks  # removed after train()


def test_bridge_matches_a_hand_written_sophia_loop(tmp_path):
    """Loss, clipping, Sophia's bs and the Hessian refresh (every step, so step 2 depends on it)."""
    steps, lr, max_grad_norm = 2, 1e-2, 0.5
    bridged, by_hand = tiny_llama(), tiny_llama()
    args = training_args(tmp_path, max_steps=steps, max_grad_norm=max_grad_norm)
    trainer = trainer_for(tmp_path, bridged, GradDiff(gamma=0.7), args=args, sophia={"hessian_interval": 1})
    pairs = list(trainer.get_train_dataloader())[:steps]  # the same order as train() draws
    trainer.train()

    objective = GradDiff(gamma=0.7)
    objective.prepare(by_hand, trainer.forget_batches, trainer.retain_batches)
    params = [p for p in by_hand.parameters() if p.requires_grad]
    optimizer = Sophia(params, lr=lr, weight_decay=0.0, estimator="gnb", hessian_interval=1)
    generator = torch.Generator().manual_seed(args.seed)
    by_hand.train()
    for pair in pairs:
        batches = [pair["forget"], pair["retain"]]
        optimizer.zero_grad(set_to_none=True)
        objective.loss(by_hand, *batches)[0].backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step(bs=sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        assert optimizer.hessian_due()
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            sampled_label_cross_entropy(by_hand, batch, batch, generator, 1.0 / len(batches)).backward()
        optimizer.update_hessian()

    for (name, p), q in zip(bridged.named_parameters(), by_hand.parameters()):
        assert not torch.equal(p, tiny_llama().get_parameter(name)), name
        torch.testing.assert_close(p, q, msg=name)


def test_npo_reference_is_the_initial_model(tmp_path):
    model = tiny_llama()
    initial = copy.deepcopy(model)
    trainer = trainer_for(tmp_path, model, NPO(beta=0.1), args=training_args(tmp_path, max_steps=2))
    trainer.train()
    trainer.train()  # a second call continues: it must not re-prepare from the unlearned model
    for batch in trainer.forget_batches:
        with torch.no_grad():
            expected = sequence_logprobs(initial, batch).sum_logp.double()
            now = sequence_logprobs(model, batch).sum_logp.double()
        reference = trainer.objective.reference_logprobs(batch)
        torch.testing.assert_close(reference, expected)
        assert (reference - now).abs().max() > 1e-3  # the model moved: the check above can fail


def test_trainer_optimizer_when_sophia_is_off(tmp_path):
    model = tiny_llama()
    trainer = trainer_for(
        tmp_path,
        model,
        "ga",
        sophia=False,
        retain_dataset=None,
        args=training_args(tmp_path, max_steps=1, learning_rate=1e-3),
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)


def test_a_sophia_given_in_optimizers_gets_bs_and_refresh(tmp_path):
    model = tiny_llama()
    sophia = Sophia(model.parameters(), lr=1e-3, hessian_interval=1)  # bs=None: Sophia raises unless it is passed
    trainer = trainer_for(
        tmp_path, model, sophia=False, optimizers=(sophia, None), args=training_args(tmp_path, max_steps=1)
    )
    trainer.train()
    assert any(s["hessian"].abs().sum() > 0 for s in sophia.state.values())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"forget_dataset": []}, ValueError, "forget_dataset is empty"),
        ({"retain_dataset": None}, ValueError, "needs retain data"),
        ({"retain_dataset": []}, ValueError, "needs retain data"),
        ({"train_dataset": [1]}, ValueError, "no train_dataset"),
        ({"sophia": {"bs": 10}}, TypeError, r"no setting \['bs'\]"),
        ({"sophia": {"rho": -1.0}}, ValueError, "rho"),
        ({"sophia": {"estimator": "hutchinson"}}, ValueError, "hutchinson"),
        ({"sophia": "yes"}, TypeError, "sophia must be"),
        (
            {"optimizers": (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), None)},
            ValueError,
            "sophia=False",
        ),
    ],
)
def test_clear_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        trainer_for(tmp_path, tiny_llama(), **kwargs)


def test_ga_needs_no_retain_data(tmp_path):
    trainer = trainer_for(tmp_path, tiny_llama(), "ga", retain_dataset=None)
    pair = next(iter(trainer.get_train_dataloader()))
    assert set(pair) == {"forget"}
