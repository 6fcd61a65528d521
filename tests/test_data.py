"""Tests for unlearn_fast.data: synthetic facts, splits, loaders and tokenisation."""

import copy
import json
from collections import Counter

import pytest
import torch

from unlearn_fast.data import (
    IGNORE_INDEX,
    QADataset,
    QAExample,
    collate,
    encode_prompt,
    encode_qa,
    load_qa_csv,
    load_qa_jsonl,
    make_batches,
    make_facts_dataset,
    make_fictitious_facts,
    split_forget_retain,
    world_facts,
)
from unlearn_fast.models.loaders import load_smollm2_tokenizer


@pytest.fixture(scope="module")
def chat_tok():
    tok = load_smollm2_tokenizer()
    assert tok.chat_template is not None
    return tok


@pytest.fixture(scope="module")
def plain_tok(chat_tok):
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = None
    return tok


# ------------------------------------------------------------------ synthetic facts


def test_generation_is_deterministic():
    assert make_fictitious_facts(seed=3) == make_fictitious_facts(seed=3)
    assert make_fictitious_facts(seed=3) != make_fictitious_facts(seed=4)


def test_generation_shape():
    facts = make_fictitious_facts(num_people=20, questions_per_person=10, num_perturbed=3)
    assert len(facts) == 200
    per_person = Counter(ex.person for ex in facts)
    assert len(per_person) == 20 and set(per_person.values()) == {10}
    assert len({ex.question for ex in facts}) == 200  # no repeated question
    for ex in facts:
        assert ex.person in ex.question and ex.person in ex.answer
        assert ex.answer.endswith(".") and ex.paraphrased_answer != ex.answer
        assert len(ex.perturbed_answers) == 3
        assert len(set(ex.perturbed_answers)) == 3
        assert ex.answer not in ex.perturbed_answers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_people": 0},
        {"questions_per_person": 0},
        {"questions_per_person": 99},
        {"num_perturbed": 50},
    ],
)
def test_generation_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_fictitious_facts(**kwargs)


@pytest.mark.parametrize("percent", [1, 5, 10])
def test_split_sizes_and_disjointness(percent):
    facts = make_fictitious_facts(num_people=100, questions_per_person=10, seed=1)
    forget, retain = split_forget_retain(facts, forget_percent=percent, seed=1)
    assert len(forget) == percent * 10  # exactly percent% of 1000 examples
    assert len(forget) + len(retain) == len(facts)
    assert not set(forget) & set(retain)
    # Whole people are forgotten: nobody appears on both sides.
    assert not {ex.person for ex in forget} & {ex.person for ex in retain}
    # Order within each split follows the input.
    assert forget == [ex for ex in facts if ex in set(forget)]


def test_split_rounds_up_to_one_person_and_depends_on_seed():
    facts = make_fictitious_facts(num_people=20, questions_per_person=10)
    forget, _ = split_forget_retain(facts, forget_percent=1, seed=0)
    assert len({ex.person for ex in forget}) == 1 and len(forget) == 10
    people = {frozenset(ex.person for ex in split_forget_retain(facts, 10, seed=s)[0]) for s in range(5)}
    assert len(people) > 1


def test_split_without_person_splits_per_example():
    facts = [QAExample(f"q{i}?", f"a{i}.", f"a{i}.", ()) for i in range(100)]
    forget, retain = split_forget_retain(facts, forget_percent=5)
    assert len(forget) == 5 and len(retain) == 95


@pytest.mark.parametrize("percent", [0, 100, -1])
def test_split_rejects_bad_percent(percent):
    with pytest.raises(ValueError, match="forget_percent"):
        split_forget_retain(make_fictitious_facts(num_people=5), percent)


def test_split_needs_two_people():
    with pytest.raises(ValueError, match="at least 2"):
        split_forget_retain(make_fictitious_facts(num_people=1), 10)


def test_world_facts():
    facts = world_facts()
    assert 30 <= len(facts) <= 50
    assert len({ex.question for ex in facts}) == len(facts)
    for ex in facts:
        assert ex.question.endswith("?")
        assert ex.answer not in ex.perturbed_answers and len(set(ex.perturbed_answers)) == 3


def test_make_facts_dataset():
    ds = make_facts_dataset(num_people=20, questions_per_person=10, forget_percent=10, seed=2)
    assert len(ds.forget) == 20 and len(ds.retain) == 180
    assert ds.world_facts == world_facts()
    assert ds == make_facts_dataset(num_people=20, questions_per_person=10, forget_percent=10, seed=2)


# ------------------------------------------------------------------ loaders


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    rows = [
        {
            "question": "Q1?",
            "answer": "A1.",
            "paraphrased_answer": "P1.",
            "perturbed_answers": ["W1.", "W2."],
            "person": "Ann",
        },
        {"question": "Q2?", "answer": "A2."},
    ]
    path = _write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n")
    assert load_qa_jsonl(path) == [
        QAExample("Q1?", "A1.", "P1.", ("W1.", "W2."), "Ann"),
        QAExample("Q2?", "A2.", "A2.", (), ""),
    ]


def test_load_jsonl_custom_keys(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps({"prompt": "Q?", "response": "A.", "perturbed_answer": ["W."]}))
    [ex] = load_qa_jsonl(path, question_key="prompt", answer_key="response", perturbed_key="perturbed_answer")
    assert (ex.question, ex.answer, ex.perturbed_answers) == ("Q?", "A.", ("W.",))


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"question": "Q?", "answer": "A."}\n{"question": "Q2?"}\n', r"line 2.*'answer'"),
        ('{"question": "Q?", "answer": "A."}\nnot json\n', r"line 2.*not valid JSON"),
        ('["Q?", "A."]\n', r"line 1.*expected an object"),
        ('{"question": "Q?", "answer": 3}\n', r"line 1.*non-empty string"),
        ('{"question": "Q?", "answer": "A.", "perturbed_answers": [1]}\n', r"perturbed_answers"),
        ("\n\n", r"no examples"),
    ],
)
def test_load_jsonl_errors(tmp_path, text, match):
    path = _write(tmp_path / "bad.jsonl", text)
    with pytest.raises(ValueError, match=match) as err:
        load_qa_jsonl(path)
    assert str(path) in str(err.value)


def test_load_csv(tmp_path):
    path = _write(
        tmp_path / "d.csv",
        'question,answer,perturbed_answers,person\n"Where, exactly?",Here.,There. | Nowhere.,Bo\nQ2?,A2.,,\n',
    )
    assert load_qa_csv(path) == [
        QAExample("Where, exactly?", "Here.", "Here.", ("There.", "Nowhere."), "Bo"),
        QAExample("Q2?", "A2.", "A2.", (), ""),
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "no examples"),
        ("question,answer\n", "only a header"),
        ("q,answer\nQ?,A.\n", r"no column 'question'"),
        ("question,answer\nQ?,A.\nQ2?\n", r"line 3.*'answer'"),
    ],
)
def test_load_csv_errors(tmp_path, text, match):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=match) as err:
        load_qa_csv(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ tokenisation


EXAMPLE = QAExample(
    "Where was Orla Stroud born?", "Orla Stroud was born in Lisbon.", "Orla Stroud's birthplace is Lisbon.", ()
)


def _check_masking(tok, enc):
    ids, labels, n = enc["input_ids"], enc["labels"], enc["prompt_length"]
    assert len(ids) == len(labels)
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
    assert ids[-1] == tok.eos_token_id
    assert ids[:n] == encode_prompt(tok, EXAMPLE.question)
    assert tok.decode(ids[n:-1]).strip() == EXAMPLE.answer


def test_encode_qa_chat_template(chat_tok):
    enc = encode_qa(chat_tok, EXAMPLE)
    _check_masking(chat_tok, enc)
    prompt = chat_tok.decode(enc["input_ids"][: enc["prompt_length"]])
    assert EXAMPLE.question in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert encode_qa(chat_tok, (EXAMPLE.question, EXAMPLE.answer)) == enc


def test_encode_qa_plain(plain_tok):
    enc = encode_qa(plain_tok, EXAMPLE)
    _check_masking(plain_tok, enc)
    prompt = plain_tok.decode(enc["input_ids"][: enc["prompt_length"]])
    assert prompt == f"Question: {EXAMPLE.question}\nAnswer:"
    assert "<|im_start|>" not in plain_tok.decode(enc["input_ids"])


def test_encode_qa_truncates_answer_only(plain_tok):
    full = encode_qa(plain_tok, EXAMPLE)
    n = full["prompt_length"]
    cut = encode_qa(plain_tok, EXAMPLE, max_length=n + 2)
    assert cut["input_ids"] == full["input_ids"][: n + 2]
    assert cut["labels"] == full["labels"][: n + 2]
    with pytest.raises(ValueError, match="max_length"):
        encode_qa(plain_tok, EXAMPLE, max_length=n)


def test_collate_pads_right():
    encoded = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_length": 1},
        {"input_ids": [8], "labels": [8], "prompt_length": 0},
    ]
    batch = collate(encoded, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def test_make_batches(chat_tok):
    facts = make_fictitious_facts(num_people=2, questions_per_person=5)
    batches = list(make_batches(chat_tok, facts, batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        # Every example has at least one supervised token.
        assert ((b["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()

    def first_rows(seed):
        return [b["input_ids"][0].tolist() for b in make_batches(chat_tok, facts, 4, shuffle=True, seed=seed)]

    assert first_rows(1) == first_rows(1)
    assert first_rows(1) != first_rows(2)


def test_qa_dataset_with_dataloader(chat_tok):
    facts = make_fictitious_facts(num_people=1, questions_per_person=3)
    ds = QADataset(chat_tok, facts)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate)
    [batch] = list(loader)
    assert batch["input_ids"].shape[0] == 3
    assert batch["input_ids"][0].tolist()[: ds[0]["prompt_length"]] == encode_prompt(chat_tok, facts[0].question)


def test_domain_texts_are_deterministic_distinct_and_of_their_domain():
    from unlearn_fast.data import domain_texts

    python = domain_texts("python", 40, chars=200)
    assert python == domain_texts("python", 40, chars=200)  # same installation, same chunks
    assert len(set(python)) == 40 and all(len(t) == 200 for t in python)
    assert sum("\n" in t and any(k in t for k in "(=:#") for t in python) >= 36  # lines of code
    assert domain_texts("python", 40, chars=200, seed=1) != python
    prose = domain_texts("prose", 20, chars=200)
    assert len(set(prose)) == 20 and all(t[0].isupper() and 100 < len(t) <= 200 for t in prose)
    assert all(sum(c.isalpha() or c == " " for c in t) >= 0.9 * len(t) for t in prose)
    with pytest.raises(ValueError, match="only .* prose chunks"):
        domain_texts("prose", 10**6)
    with pytest.raises(ValueError, match="domain must be one of"):
        domain_texts("poetry", 3)
