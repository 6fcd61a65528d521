"""TOFU-style metrics: the pure statistics against direct computations, the model-based ones on
tiny random models, and evaluate() end to end."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

from unlearn_fast.data import FactsDataset, QAExample, collate, encode_qa, make_facts_dataset, world_facts
from unlearn_fast.evaluate import (
    answer_probability,
    evaluate,
    forget_quality,
    format_table,
    generate_answers,
    harmonic_mean,
    mink_auc,
    mink_score,
    perplexity,
    rouge_l_recall,
    sequence_logprobs,
    truth_ratios,
    truth_score,
)
from unlearn_fast.models.loaders import load_smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


def tiny_llama(vocab_size=64, hidden_size=32, layers=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kwargs,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    # initializer_range spreads the logits, so greedy decoding has no near-ties.
    return tiny_llama(vocab_size=len(tokenizer), hidden_size=16, layers=1, initializer_range=0.5)


def toy_batch(vocab_size=64, seed=0):
    """Two right-padded sequences with their prompts masked out of the labels."""
    g = torch.Generator().manual_seed(seed)
    encoded = []
    for prompt_len, answer_len in ((3, 4), (5, 2)):
        ids = torch.randint(0, vocab_size, (prompt_len + answer_len,), generator=g).tolist()
        encoded.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return collate(encoded, pad_token_id=0)


def direct_logprobs(model, batch):
    """The specification: full logits, log-softmax, gathered on the shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    gathered = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, gathered, torch.zeros_like(gathered)), scored


# ---------------------------------------------------------------------------------------------
# Pure statistics


@pytest.mark.parametrize(
    "generated,reference,expected",
    [
        ("the cat on mat", "the cat sat on the mat", 4 / 6),
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("mat the on", "the cat sat on the mat", 2 / 6),  # LCS "the on" (or "on mat"), not a bag of words
        ("a dog", "the cat sat on the mat", 0.0),
        ("", "Paris.", 0.0),
        ("PARIS", "Paris.", 1.0),  # lower-cased, punctuation dropped
        ("cats running", "The cat runs.", 2 / 3),  # stemmed: cat, run
    ],
)
def test_rouge_l_recall_hand_computed(generated, reference, expected):
    assert rouge_l_recall(generated, reference) == pytest.approx(expected)


def test_forget_quality_is_scipy_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=30), rng.lognormal(0.5, size=40)
    assert forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue, rel=1e-12)
    # KS only sees the order, so TOFU's inverted ratio 1/R gives the same p-value.
    assert forget_quality(1 / a, 1 / b) == pytest.approx(forget_quality(a, b), rel=1e-12)
    assert forget_quality(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference truth ratios"):
        forget_quality(a, [])


def pair_count_auc(members, nonmembers):
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def test_mink_auc_matches_pair_count():
    rng = np.random.default_rng(1)
    for _ in range(20):
        # Small integers, so ties are frequent.
        members = rng.integers(-5, 5, size=rng.integers(1, 30))
        nonmembers = rng.integers(-6, 4, size=rng.integers(1, 30))
        assert mink_auc(members, nonmembers) == pytest.approx(pair_count_auc(members, nonmembers))


def test_mink_auc_known_cases():
    assert mink_auc([3.0, 4.0, 5.0], [0.0, 1.0]) == 1.0
    assert mink_auc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0
    assert mink_auc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.5
    assert mink_auc([2.0] * 4, [2.0] * 7) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        mink_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mink_auc([float("nan")], [1.0])


def test_mink_score():
    logp = [-float(i) for i in range(1, 11)]  # -1 .. -10
    assert mink_score(logp, k=20) == pytest.approx(-9.5)  # the two lowest: -10, -9
    assert mink_score(logp, k=100) == pytest.approx(-5.5)
    assert mink_score([-0.5, -2.0], k=20) == -2.0  # always at least one token
    with pytest.raises(ValueError):
        mink_score([], k=20)
    with pytest.raises(ValueError):
        mink_score(logp, k=0)


def test_truth_score_and_harmonic_mean():
    assert truth_score([0.25, 1.5, 1.0]) == pytest.approx(0.75 / 3)
    assert harmonic_mean([0.5, 0.25]) == pytest.approx(2 / (2 + 4))
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0


# ---------------------------------------------------------------------------------------------
# sequence_logprobs


def test_sequence_logprobs_matches_log_softmax():
    model = tiny_llama()
    batch = toy_batch()
    out = sequence_logprobs(model, batch)
    expected, scored = direct_logprobs(model, batch)
    torch.testing.assert_close(out.token_logp.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.n_tokens.tolist() == scored.sum(-1).tolist() == [4, 2]
    torch.testing.assert_close(out.sum_logp.double(), expected.sum(-1), rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_gradients_match_log_softmax():
    model = tiny_llama()
    batch = toy_batch(seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(sequence_logprobs(model, batch).sum_logp.sum(), params)
    expected = torch.autograd.grad(direct_logprobs(model, batch)[0].sum(), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)


def test_sequence_logprobs_applies_logit_scaling():
    # Granite divides its logits by config.logits_scaling after the LM head.
    torch.manual_seed(0)
    model = GraniteForCausalLM(
        GraniteConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            logits_scaling=4.0,
        )
    ).eval()
    batch = toy_batch()
    expected, _ = direct_logprobs(model, batch)
    torch.testing.assert_close(sequence_logprobs(model, batch).token_logp.double(), expected, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_through_peft_lora():
    import peft

    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    batch = toy_batch()
    expected, _ = direct_logprobs(model, batch)
    torch.testing.assert_close(sequence_logprobs(model, batch).token_logp.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Model-based metrics


EXAMPLES = [
    QAExample(
        "Where was Ada born?",
        "Ada was born in Lisbon.",
        "Ada's birthplace is Lisbon.",
        ("Ada was born in Oslo.", "Ada was born in Quito, Ecuador."),
    ),
    QAExample("What does Bo do?", "Bo works as a baker.", "By profession, Bo is a baker.", ("Bo works as a tailor.",)),
    QAExample(
        "Which award has Cy received?",
        "Cy received the Copperleaf Prize.",
        "Cy was honoured with the Copperleaf Prize.",
        (
            "Cy received the Golden Quill Award.",
            "Cy received the Azure Pen Award.",
            "Cy received the Calder Medal for Poetry.",
        ),
    ),
]


def test_answer_probability_is_geometric_mean_token_probability(model, tokenizer):
    probs = answer_probability(model, tokenizer, EXAMPLES, batch_size=2)
    assert all(0 < p <= 1 for p in probs)
    batch = collate([encode_qa(tokenizer, ex) for ex in EXAMPLES], pad_token_id=0)
    expected, scored = direct_logprobs(model, batch)
    np.testing.assert_allclose(probs, torch.exp(expected.sum(-1) / scored.sum(-1)).detach(), rtol=1e-4)
    # Answer perplexity of one example is the inverse of its answer probability.
    assert perplexity(model, tokenizer, EXAMPLES[:1]) == pytest.approx(1 / probs[0], rel=1e-6)


def test_truth_ratio_from_length_normalised_probabilities(model, tokenizer):
    ratios = truth_ratios(model, tokenizer, EXAMPLES, batch_size=4)
    for ex, ratio in zip(EXAMPLES, ratios):
        as_answers = [QAExample(ex.question, a, a, ()) for a in (ex.paraphrased_answer, *ex.perturbed_answers)]
        paraphrased, *perturbed = answer_probability(model, tokenizer, as_answers)
        assert ratio == pytest.approx(np.mean(perturbed) / paraphrased, rel=1e-6)


def test_missing_perturbed_answers_and_empty_inputs_are_clear_errors(model, tokenizer):
    bare = QAExample("Where is Paris?", "In France.", "In France.", ())
    with pytest.raises(ValueError, match="perturbed answers.*'Where is Paris\\?'"):
        truth_ratios(model, tokenizer, [EXAMPLES[0], bare])
    with pytest.raises(ValueError, match="empty"):
        answer_probability(model, tokenizer, [])
    with pytest.raises(ValueError, match="example 1 of the 'retain' split"):
        evaluate(model, tokenizer, FactsDataset(EXAMPLES[:1], [EXAMPLES[1], bare], EXAMPLES[2:]))
    with pytest.raises(ValueError, match="'world' split.*empty"):
        evaluate(model, tokenizer, FactsDataset(EXAMPLES[:1], EXAMPLES[1:], []))


def test_perplexity_of_texts(model, tokenizer):
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees."]
    encoded = []
    for text in texts:
        ids = tokenizer.encode(text)
        encoded.append({"input_ids": ids, "labels": ids})
    expected, scored = direct_logprobs(model, collate(encoded, pad_token_id=0))
    assert perplexity(model, tokenizer, texts) == pytest.approx(
        math.exp(-expected.sum().item() / scored.sum().item()), rel=1e-5
    )


def test_batched_generation_matches_one_by_one(model, tokenizer):
    questions = [ex.question for ex in EXAMPLES] + ["Hi?"]
    batched = generate_answers(model, tokenizer, questions, batch_size=4, max_new_tokens=5)
    single = generate_answers(model, tokenizer, questions, batch_size=1, max_new_tokens=5)
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


# ---------------------------------------------------------------------------------------------
# evaluate()


def test_evaluate_end_to_end(model, tokenizer):
    facts = make_facts_dataset(num_people=4, questions_per_person=2, forget_percent=25, num_perturbed=2)
    dataset = FactsDataset(facts.forget, facts.retain[:3], world_facts()[:3])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    results = evaluate(model, tokenizer, dataset, batch_size=4, max_new_tokens=4)

    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for split, n in (("forget", len(dataset.forget)), ("retain", 3), ("world", 3)):
        r = results[split]
        assert r["n"] == n
        assert 0 < r["answer_prob"] <= 1 and 0 < r["choice_prob"] <= 1
        assert 0 <= r["rouge_l"] <= 1 and 0 <= r["truth_score"] <= 1
        assert r["truth_ratio"] > 0 and r["mink"] < 0 and r["ppl"] >= 1
    assert results["forget_quality"] is None
    assert 0 <= results["model_utility"] <= 1 and 0 <= results["mink_auc"] <= 1
    assert len(results["forget_truth_ratios"]) == len(dataset.forget)

    # Against its own truth ratios the model is indistinguishable from the reference.
    again = evaluate(
        model, tokenizer, dataset, batch_size=2, generate=False, reference_truth_ratios=results["forget_truth_ratios"]
    )
    assert again["forget_quality"] == pytest.approx(1.0)
    assert again["forget"]["rouge_l"] is None
    assert again["forget"]["answer_prob"] == pytest.approx(results["forget"]["answer_prob"], rel=1e-5)

    table = format_table(results)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines] == [
        "split",
        "forget",
        "retain",
        "world",
        "forget_quality",
        "model_utility",
        "mink_auc",
    ]
    assert len({len(line) for line in lines[:4]}) == 1  # the split rows are aligned
    assert "forget_quality  -" in format_table(results)


def test_evaluate_progress_bars_go_to_stderr_only_when_asked(model, tokenizer, capsys):
    facts = make_facts_dataset(num_people=2, questions_per_person=1, forget_percent=50, num_perturbed=1)
    dataset = FactsDataset(facts.forget, facts.retain, world_facts()[:1])

    quiet = evaluate(model, tokenizer, dataset, max_new_tokens=2, progress=False)
    assert capsys.readouterr().err == ""
    shown = evaluate(model, tokenizer, dataset, max_new_tokens=2)
    err = capsys.readouterr().err
    assert all(f"scoring {split}" in err for split in ("forget", "retain", "world"))
    assert "generating answers" in err
    assert shown == quiet
