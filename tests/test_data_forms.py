"""Tests for the one data entry point: unlearn_fast.data.as_examples, as_batches and check_examples."""

import json
import re
from pathlib import Path

import pytest
import torch

from unlearn_fast.data import (
    ACCEPTED_FORMS,
    QADataset,
    QAExample,
    as_batches,
    as_examples,
    check_examples,
    collate,
)


class CharTokenizer:
    """Just what unlearn_fast.data needs of a tokenizer: one token per ASCII character (as in test_llmeraser)."""

    chat_template = None
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 2, 3

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) if 32 <= ord(c) < 128 else self.unk_token_id for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids


TOK = CharTokenizer()
FULL_ROW = {
    "question": "Q1?",
    "answer": "A1.",
    "paraphrased_answer": "P1.",
    "perturbed_answers": ["W1.", "W2."],
    "person": "Ann",
}
FULL = QAExample("Q1?", "A1.", "P1.", ("W1.", "W2."), "Ann")
PLAIN = QAExample("Q2?", "A2.", "A2.", ())


# ------------------------------------------------------------------ accepted forms


def test_qaexamples_are_kept_as_they_are():
    examples = [FULL, PLAIN]
    out = as_examples(examples, "forget")
    assert out == examples and all(a is b for a, b in zip(out, examples))


def test_question_answer_pairs():
    assert as_examples([("Q2?", "A2."), ["Q2?", "A2."]]) == [PLAIN, PLAIN]


def test_question_answer_rows_keep_their_extra_fields():
    assert as_examples([FULL_ROW, {"question": "Q2?", "answer": "A2.", "id": 7}]) == [FULL, PLAIN]


def test_prompt_response_rows():
    assert as_examples([{"prompt": "Q2?", "response": "A2."}]) == [PLAIN]
    assert as_examples(
        [
            {
                "prompt": "Q1?",
                "response": "A1.",
                "paraphrased_answer": "P1.",
                "perturbed_answers": ["W1.", "W2."],
                "person": "Ann",
            }
        ]
    ) == [FULL]


def test_chat_rows_take_the_last_user_turn_before_the_last_assistant_turn():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "A2."},
        ]
    }
    assert as_examples([row]) == [PLAIN]
    # A trailing user turn has no answer yet: the last answered question counts.
    trailing = {"messages": [*row["messages"], {"role": "user", "content": "And?"}], "person": "Ann"}
    assert as_examples([trailing]) == [QAExample("Q2?", "A2.", "A2.", (), "Ann")]


class FakeDataset:
    """`datasets` is not installed here: this stands in for a `datasets.Dataset` with the interface that
    as_examples relies on (column_names and features, iteration over rows as dicts)."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []
        self.features = {name: "Value(string)" for name in self.column_names}

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


def test_dataset_rows():
    try:
        import datasets
    except ImportError:
        dataset = FakeDataset([FULL_ROW, {"question": "Q2?", "answer": "A2."}])
    else:
        dataset = datasets.Dataset.from_list(
            [
                FULL_ROW,
                {
                    "question": "Q2?",
                    "answer": "A2.",
                    "paraphrased_answer": None,
                    "perturbed_answers": [],
                    "person": None,
                },
            ]
        )
    assert as_examples(dataset, "forget") == [FULL, PLAIN]


def test_a_dataset_dict_asks_for_a_split():
    with pytest.raises(TypeError, match=r"splits \['train'\]: pick one, e.g. data\['train'\]"):
        as_examples({"train": FakeDataset([FULL_ROW])}, "forget")


@pytest.mark.parametrize(
    "name, content",
    [
        ("rows.json", json.dumps([FULL_ROW, {"prompt": "Q2?", "response": "A2."}])),
        ("rows.json", json.dumps({"data": [FULL_ROW, {"question": "Q2?", "answer": "A2."}]})),
        (
            "rows.jsonl",
            json.dumps(FULL_ROW)
            + "\n\n"
            + json.dumps({"messages": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]})
            + "\n",
        ),
        (
            "rows.csv",
            "question,answer,paraphrased_answer,perturbed_answers,person\nQ1?,A1.,P1.,W1. | W2.,Ann\nQ2?,A2.,,,\n",
        ),
        (
            "ROWS.CSV",
            "prompt,response,paraphrased_answer,perturbed_answers,person\nQ1?,A1.,P1.,W1.|W2.,Ann\nQ2?,A2.,,,\n",
        ),
    ],
)
@pytest.mark.parametrize("as_str", [True, False])
def test_files(tmp_path, name, content, as_str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert as_examples(str(path) if as_str else path, "forget") == [FULL, PLAIN]


@pytest.mark.parametrize(
    "name, content", [("e.json", "[]"), ("e.jsonl", "\n"), ("e.csv", ""), ("h.csv", "question,answer\n")]
)
def test_empty_inputs_give_no_examples(tmp_path, name, content):
    assert as_examples([]) == [] and as_examples(FakeDataset([])) == []
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert as_examples(tmp_path / name) == []


# ------------------------------------------------------------------ rejections


def test_accepted_forms_are_quoted_by_the_errors():
    with pytest.raises(TypeError, match=re.escape(f"forget[1] has keys ['q', 'a']; expected {ACCEPTED_FORMS}")):
        as_examples([FULL_ROW, {"q": "Q?", "a": "A."}], "forget")
    with pytest.raises(TypeError, match=re.escape(f"forget[0] must be {ACCEPTED_FORMS}; got 1")):
        as_examples([1], "forget")
    with pytest.raises(
        TypeError, match=re.escape(f"forget must be a list of QAExample, pairs or rows (each {ACCEPTED_FORMS})")
    ):
        as_examples(3, "forget")


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([{"question": "Q?", "answer": ""}], ValueError, r"retain\[0\]: 'answer' must be a non-empty string, got ''"),
        ([("Q?", " ")], ValueError, r"retain\[0\]: 'answer' must be a non-empty string"),
        ([QAExample("Q?", "", "", ())], ValueError, r"retain\[0\]: 'answer' must be a non-empty string"),
        ([{"prompt": None, "response": "A."}], ValueError, r"'prompt' must be a non-empty string, got None"),
        ([{"question": "Q?"}], TypeError, r"retain\[0\] has keys \['question'\]; expected"),
        ([("Q?", "A.", "extra")], TypeError, r"retain\[0\] must be a QAExample or a \(question, answer\) pair"),
        (
            [{"messages": [{"role": "user", "content": "Q?"}]}],
            ValueError,
            r"retain\[0\]: the chat has no assistant turn",
        ),
        ([{"messages": [{"role": "assistant", "content": "A."}]}], ValueError, "no user turn before"),
        ([{"messages": "Q? A."}], ValueError, r"'messages' must be a list of \{role, content\} turns"),
        (
            [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": 3}]}],
            ValueError,
            "'answer' must be a non-empty string, got 3",
        ),
    ],
)
def test_bad_rows(rows, error, match):
    with pytest.raises(error, match=match):
        as_examples(rows, "retain")


@pytest.mark.parametrize(
    "data, error, match",
    [
        ("forget this", TypeError, "forget must be a list of QAExample.*got a str that is no path to an existing file"),
        (b"rows", TypeError, "got a bytes"),
        ({"question": "Q?", "answer": "A."}, TypeError, "got a dict"),
        (None, TypeError, "got a NoneType"),
    ],
)
def test_bad_containers(data, error, match):
    with pytest.raises(error, match=match):
        as_examples(data, "forget")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"forget: .*missing.jsonl is not a file"):
        as_examples(str(tmp_path / "missing.jsonl"), "forget")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        as_examples(tmp_path, "forget")
    (tmp_path / "rows.txt").write_text("Q? A.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"suffix '.txt'; expected one of .json, .jsonl, .csv"):
        as_examples(str(tmp_path / "rows.txt"), "forget")
    (tmp_path / "rows.jsonl").write_text(json.dumps(FULL_ROW) + "\n" + json.dumps({"q": "Q?", "a": "A."}) + "\n")
    with pytest.raises(TypeError, match=r"forget: .*rows.jsonl, line 2 has keys \['q', 'a'\]; expected"):
        as_examples(tmp_path / "rows.jsonl", "forget")
    (tmp_path / "rows.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"expected a JSON list of rows .* with keys \['rows'\]"):
        as_examples(tmp_path / "rows.json", "forget")
    (tmp_path / "rows.csv").write_text("q,a\nQ?,A.\n")
    with pytest.raises(ValueError, match=r"header has columns \['q', 'a'\]; expected question,answer or prompt"):
        as_examples(tmp_path / "rows.csv", "forget")
    (tmp_path / "rows.csv").write_text("question,answer\nQ?,A.\nQ2?,\n")
    with pytest.raises(ValueError, match=r"rows.csv, line 3: 'answer' must be a non-empty string"):
        as_examples(tmp_path / "rows.csv", "forget")


def test_check_examples_accepts_every_form_but_not_none():
    assert check_examples([FULL_ROW, ("Q2?", "A2.")], "train_data") == [FULL, PLAIN]
    with pytest.raises(ValueError, match="train_data is empty"):
        check_examples([], "train_data")
    with pytest.raises(TypeError, match="train_data must be a list of QAExample"):
        check_examples("question", "train_data")


# ------------------------------------------------------------------ batches


def test_batches_of_examples_are_collated_in_order():
    examples = [FULL, PLAIN, QAExample("A longer question?", "And a longer answer.", "-", ()), PLAIN, FULL]
    dataset = QADataset(TOK, examples, max_length=40)  # cuts the long answer
    expected = [dataset.collate([dataset[i] for i in range(s, min(s + 2, len(examples)))]) for s in (0, 2, 4)]
    rows = [
        FULL_ROW,
        ("Q2?", "A2."),
        {"prompt": "A longer question?", "response": "And a longer answer."},
        {"messages": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]},
        FULL,
    ]
    for data in (examples, rows):
        batches = as_batches(data, tokenizer=TOK, batch_size=2, max_length=40, what="forget")
        assert len(batches) == len(expected)
        for got, want in zip(batches, expected):
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_batches_from_a_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(FULL_ROW) + "\n", encoding="utf-8")
    [batch] = as_batches(path, tokenizer=TOK, batch_size=4, max_length=32, what="forget")
    [want] = as_batches([FULL], tokenizer=TOK, batch_size=4, max_length=32, what="forget")
    torch.testing.assert_close(batch["input_ids"], want["input_ids"])


def _batch(n: int = 2, width: int = 5) -> dict[str, torch.Tensor]:
    return collate([{"input_ids": list(range(4, 4 + width)), "labels": [-100, *range(5, 4 + width)]}] * n, 0)


def test_collated_batches_pass_through():
    batches = [_batch(), _batch(1, 3)]
    out = as_batches(tuple(batches), tokenizer=None, batch_size=8, max_length=16, what="forget")
    assert isinstance(out, list) and all(a is b for a, b in zip(out, batches))
    assert as_batches([], tokenizer=None, batch_size=8, max_length=16, what="forget") == []


@pytest.mark.parametrize(
    "data, tokenizer, error, match",
    [
        ([_batch(), ("Q?", "A.")], TOK, TypeError, "forget mixes collated batches"),
        (
            [{"input_ids": torch.ones(1, 4, dtype=torch.long)}],
            None,
            ValueError,
            "forget batches need 'input_ids' and 'labels'",
        ),
        (
            [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long)}],
            None,
            ValueError,
            r"input_ids \(2, 4\) and labels \(2, 5\) must have one shape \[batch, sequence\]",
        ),
        ([{"input_ids": [[1, 2]], "labels": [[1, 2]]}], None, TypeError, "must be tensors, got list and list"),
        ([("Q?", "A.")], None, ValueError, "forget holds question/answer examples: pass tokenizer= to encode them"),
        ("forget this", TOK, TypeError, "forget must be a list of examples or of batches"),
        (_batch(), TOK, TypeError, "forget must be a list of examples or of batches.*got a dict"),
        (
            [{"q": "Q?", "a": "A."}],
            TOK,
            TypeError,
            re.escape(f"forget[0] has keys ['q', 'a']; expected {ACCEPTED_FORMS}"),
        ),
    ],
)
def test_bad_batches(data, tokenizer, error, match):
    with pytest.raises(error, match=match):
        as_batches(data, tokenizer=tokenizer, batch_size=2, max_length=16, what="forget")


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        as_batches([PLAIN], tokenizer=TOK, batch_size=0, max_length=16, what="forget")


def test_paths_are_accepted_as_pathlike_and_str():
    # A str naming no file but with a data suffix is read as a path (and reported missing), not as text.
    with pytest.raises(FileNotFoundError):
        as_batches("nowhere/forget.csv", tokenizer=TOK, batch_size=2, max_length=16, what="forget")
    with pytest.raises(FileNotFoundError):
        as_examples(Path("nowhere/forget"), "forget")
