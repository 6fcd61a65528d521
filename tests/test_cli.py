"""The unlearn-fast command: every subcommand explains itself; the cheap ones run."""

import pytest

from unlearn_fast.cli import build_parser, main

SUBCOMMANDS = ["demo", "soul", "uoe", "erase", "finetune", "evaluate", "score", "backends"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: unlearn-fast " + command in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand():
    text = build_parser().format_help()
    for command in SUBCOMMANDS:
        assert command in text


def test_backends_reports_cpu(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu   reference  available" in out
    assert "cpu   cpp        available" in out


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["soul", "--optimizer", "sgd"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["soul", "uoe"])
def test_bad_unlearning_setting_is_a_usage_error_at_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--unlearn-lr", "-1"])
    assert exit_info.value.code == 2
    assert "lr must be" in capsys.readouterr().err


@pytest.mark.parametrize("command,method", [("soul", "SOUL"), ("uoe", "UOE")])
def test_checkpoint_dir_reaches_unlearn(command, method, monkeypatch, tmp_path):
    import types

    import unlearn_fast
    from unlearn_fast import cli

    class Reached(Exception):
        pass

    def unlearn(self, *args, **kwargs):  # stop the command where it hands the option to the method
        raise Reached(kwargs.get("checkpoint_dir"))

    # Skip fine-tuning and evaluation: only the option's path through the command is under test.
    monkeypatch.setattr(cli, "_dataset", lambda args: types.SimpleNamespace(forget=[], retain=[], world_facts=[]))
    monkeypatch.setattr(cli, "_finetuned", lambda *args, **kwargs: (None, None, None))
    monkeypatch.setattr(cli, "_evaluate", lambda *args, **kwargs: {"forget_truth_ratios": None})
    monkeypatch.setattr(getattr(unlearn_fast, method), "unlearn", unlearn)
    with pytest.raises(Reached) as reached:
        main([command, "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert reached.value.args == (str(tmp_path / "ckpt"),)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn_fast.models import load_smollm2_tokenizer

    tokenizer = load_smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_erase_runs_end_to_end(tiny_model_dir, tmp_path, capsys):
    import json

    common = ["--model", str(tiny_model_dir), "--people", "2", "--questions-per-person", "4", "--forget-percent",
              "50", "--max-epochs", "2", "--rank", "2", "--cache-dir", str(tmp_path / "cache"), "--no-generate",
              "--eval-retain-size", "0", "--curvature-sample", "3", "--no-fit-check"]
    saved = tmp_path / "adapter"
    assert main(["erase", *common, "--save", str(saved), "--out", str(tmp_path / "remove")]) == 0
    out = capsys.readouterr().out
    assert "LLMEraser remove: 4 of 8 training examples" in out and "adapter saved to" in out
    results = json.loads((tmp_path / "remove" / "results.json").read_text())
    assert results["erase_report"]["indices"] == [0, 1, 2, 3] and results["erase_report"]["curvature_examples"] == 4 + 3  # the removed and 3 others
    assert {"retain-only (gold)", "fine-tuned", "LLMEraser remove"} <= set(results)
    assert (saved / "adapter_model.safetensors").is_file()

    # Correct two answers of the saved adapter, from a JSONL of edits.
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"index": 5, "answer": "Nobody knows."}\n{"index": 6, "answer": "Unknown."}\n')
    correct = ["erase", *common, "--adapter", str(saved), "--task", "correct", "--edits", str(edits),
               "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main([*correct, "--out", str(tmp_path / "correct")]) == 0
    report = json.loads((tmp_path / "correct" / "results.json").read_text())["erase_report"]
    assert report["task"] == "correct_responses" and report["indices"] == [5, 6] and report["delta_norm"] > 0
    # Run again: it resumes from the final iterate (no new iteration), with the same step.
    assert main([*correct, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["erase_report"]
    assert again["iterations"] == report["iterations"] and again["delta_norm"] == pytest.approx(report["delta_norm"])


def test_erase_rejects_bad_edits_file(tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"index": "three"}\n')
    with pytest.raises(SystemExit, match="one JSON object per line"):
        main(["erase", "--model", str(tmp_path / "unused"), "--edits", str(edits), "--task", "modify"])
