"""The unlearn-fast command: every subcommand explains itself; the cheap ones run."""

import json

import pytest
from conftest import save_tiny_model

from unlearn_fast.cli import build_parser, main

SUBCOMMANDS = ["demo", "soul", "uoe", "erase", "finetune", "build-moe", "evaluate", "score", "backends"]


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
        main([command, "--lr", "-1"])
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
    monkeypatch.setattr(cli, "_specialised_moe", lambda *a, **k: (None, None, types.SimpleNamespace(texts={})))
    monkeypatch.setattr(cli, "_evaluate", lambda *args, **kwargs: {"forget_truth_ratios": None})
    monkeypatch.setattr(getattr(unlearn_fast, method), "unlearn", unlearn)
    with pytest.raises(Reached) as reached:
        main([command, "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert reached.value.args == (str(tmp_path / "ckpt"),)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_erase_runs_end_to_end(tiny_model_dir, tmp_path, capsys):
    """On the demo's data: fine-tune a tiny LoRA, remove the forget split, save the result; then
    correct two answers from a JSONL of edits, and run that again: it resumes from the checkpoint."""
    import json

    common = [
        "--model",
        str(tiny_model_dir),
        "--people",
        "2",
        "--questions-per-person",
        "4",
        "--forget-percent",
        "50",
        "--finetune-max-epochs",
        "2",
        "--finetune-lora-rank",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-generate",
        "--eval-retain-size",
        "0",
        "--curvature-sample",
        "3",
        "--no-check-fit",
    ]
    assert main(["erase", *common, "--out", str(tmp_path / "remove")]) == 0
    out = capsys.readouterr().out
    assert "LLMEraser remove: 4 of 8 training examples" in out and "result saved to" in out
    results = json.loads((tmp_path / "remove" / "results.json").read_text())
    report = results["erase_report"]
    assert report["indices"] == [0, 1, 2, 3] and report["curvature_examples"] == 4 + 3  # the removed and 3 others
    assert {"retain-only (gold)", "fine-tuned", "LLMEraser remove"} <= set(results)
    assert (tmp_path / "remove" / "weights.safetensors").is_file()
    assert json.loads((tmp_path / "remove" / "config.json").read_text())["curvature_sample"] == 3

    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"index": 5, "answer": "Nobody knows."}\n{"index": 6, "answer": "Unknown."}\n')
    correct = ["erase", *common, "--task", "correct", "--edits", str(edits), "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main([*correct, "--out", str(tmp_path / "correct")]) == 0
    report = json.loads((tmp_path / "correct" / "results.json").read_text())["erase_report"]
    assert report["task"] == "correct_responses" and report["indices"] == [5, 6] and report["delta_norm"] > 0
    # Run again: it resumes from the final iterate (no new iteration), with the same step.
    assert main([*correct, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["erase_report"]
    assert again["iterations"] == report["iterations"] and again["delta_norm"] == pytest.approx(report["delta_norm"])
    # An existing --out is kept unless --overwrite.
    assert main([*correct, "--out", str(tmp_path / "again"), "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main([*correct, "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 1


def test_erase_calibrates_damping_on_other_removals(tiny_model_dir, tmp_path, capsys):
    """--calibrate K: λ chosen from the grid on K retrained removals outside the forget split, then used."""
    import json

    args = ["erase", "--model", str(tiny_model_dir), "--people", "3", "--questions-per-person", "4",
            "--forget-percent", "25", "--finetune-max-epochs", "2", "--finetune-lora-rank", "2", "--cache-dir",
            str(tmp_path / "cache"), "--no-generate", "--eval-retain-size", "0", "--no-check-fit",
            "--curvature-method", "fisher", "--calibrate", "1", "--calibrate-dampings", "3e-3", "10",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "calibrated λ = " in out and "retrained without [" in out
    chosen = float(out.split("calibrated λ = ")[1].split()[0])
    report = json.loads((tmp_path / "out" / "results.json").read_text())["erase_report"]
    forget = report["indices"]
    assert chosen in (3e-3, 10.0) and report["damping"] == chosen and forget == list(range(len(forget)))
    calibration_set = json.loads(out.split("retrained without ")[1].split(" (")[0])
    assert len(calibration_set) == len(forget) and not set(calibration_set) & set(forget)
    # The full fine-tune, the retain-only gold and the calibration retraining: three cache entries.
    assert len(list((tmp_path / "cache").iterdir())) == 3
    with pytest.raises(SystemExit, match="demo's data"):
        main([*args[:-2], "--task", "correct", "--out", str(tmp_path / "other")])


def test_erase_rejects_bad_edits_file(tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"index": "three"}\n')
    with pytest.raises(SystemExit, match="one JSON object per line"):
        main(["erase", "--model", str(tmp_path / "unused"), "--edits", str(edits), "--task", "modify"])


# --------------------------------------------------------------------------------------------
# Flags generated from the configs: the API's defaults, a --config file under the flags


def _config_of(command, argv):
    from unlearn_fast import cli

    args = cli.build_parser().parse_args([command, *argv])
    return cli.build_config(args, _config_class(command))


def _config_class(command):
    from unlearn_fast import SOULConfig, UOEConfig
    from unlearn_fast.methods.llmeraser import LLMEraserConfig

    return {"soul": SOULConfig, "uoe": UOEConfig, "erase": LLMEraserConfig}[command]


@pytest.mark.parametrize("command", ["soul", "uoe", "erase"])
def test_no_flag_gives_the_api_defaults_and_every_field_has_a_flag(command):
    import dataclasses

    from unlearn_fast import cli

    cls = _config_class(command)
    assert _config_of(command, []) == cls()
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = {option for action in sub._actions for option in action.option_strings}
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def test_soul_flags_parse_into_the_config():
    from unlearn_fast import SOULConfig
    from unlearn_fast.objectives import NPO

    config = _config_of(
        "soul",
        [
            "--lr",
            "3e-4",
            "--batch-size",
            "2",
            "--betas",
            "0.9",
            "0.95",
            "--max-grad-norm",
            "none",
            "--estimator",
            "hutchinson",
            "--objective",
            "npo",
            "--objective-arg",
            "beta=0.2",
            "--objective-arg",
            "gamma=2",
        ],
    )
    assert config == SOULConfig(
        lr=3e-4,
        batch_size=2,
        betas=(0.9, 0.95),
        max_grad_norm=None,
        estimator="hutchinson",
        objective=NPO(beta=0.2, gamma=2),
    )


def test_uoe_and_erase_flags_parse_into_the_config():
    from unlearn_fast import UOEConfig
    from unlearn_fast.methods.llmeraser import LLMEraserConfig

    assert _config_of("uoe", ["--target", "1", "3", "--no-prefix-cache", "--anchor-weight", "0.5"]) == UOEConfig(
        target=(1, 3), prefix_cache=False, anchor_weight=0.5
    )
    assert _config_of(
        "erase", ["--curvature-sample", "5", "--no-check-fit", "--solver", "cg", "--solver-options", "seed=1", "note=x"]
    ) == LLMEraserConfig(curvature_sample=5, check_fit=False, solver="cg", solver_options={"seed": 1, "note": "x"})
    from unlearn_fast.solvers import DEFAULT_SOLVER

    assert _config_of("erase", []).solver == DEFAULT_SOLVER == LLMEraserConfig().solver  # one default, CLI and API


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_under_the_flags(tmp_path, suffix):
    import json

    from unlearn_fast import SOULConfig
    from unlearn_fast.objectives import GradDiff

    path = tmp_path / f"soul{suffix}"
    path.write_text(json.dumps({"lr": 0.001, "steps": 7, "objective": {"name": "gdiff", "gamma": 3.0}}))
    config = _config_of("soul", ["--config", str(path), "--steps", "9"])  # JSON is YAML too
    assert config == SOULConfig(lr=0.001, steps=9, objective=GradDiff(gamma=3.0))
    # --objective-arg applies to the file's objective; an unknown hyperparameter is a usage error.
    assert _config_of("soul", ["--config", str(path), "--objective-arg", "gamma=0.5"]).objective == GradDiff(gamma=0.5)


def test_unknown_objective_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["soul", "--objective", "ga", "--objective-arg", "gamma=2"])
    assert exit_info.value.code == 2
    assert "gamma" in capsys.readouterr().err


def test_finetune_flags_are_prefixed_and_keep_the_commands_defaults():
    from unlearn_fast import cli
    from unlearn_fast.finetune import FinetuneConfig

    args = cli.build_parser().parse_args(["soul", "--finetune-lr", "1e-3", "--finetune-max-epochs", "3"])
    assert cli._finetune_config(args) == FinetuneConfig(lr=1e-3, max_epochs=3)
    with pytest.raises(SystemExit):  # uoe fine-tunes nothing: its model is the specialised MoE of build-moe
        cli.build_parser().parse_args(["uoe", "--finetune-lr", "1e-3"])
    # ... built on the facts build-moe uses by default, so that `demo` finds the MoE build-moe cached.
    from unlearn_fast.specialised_moe import SpecialisedMoEConfig

    args, moe = cli.build_parser().parse_args(["uoe"]), SpecialisedMoEConfig()
    facts = ("people", "questions_per_person", "forget_percent", "data_seed")
    assert [getattr(args, f) for f in facts] == [getattr(moe, f) for f in facts]


def test_uoe_without_data_unlearns_the_specialised_moe(monkeypatch, tmp_path, capsys):
    """The uoe command's main job: the specialised MoE built on the command's facts, UOE with the API's
    defaults, the metrics before and after with the other domains' perplexity."""
    import test_specialised_moe as tsm

    from unlearn_fast import specialised_moe

    tokenizer = tsm.load_smollm2_tokenizer()
    moe, report = tsm.build_specialised_moe(tsm.tiny_llama(len(tokenizer)), tokenizer, tsm.TINY, tsm.toy_domains(),
                                            check=False, progress=False)  # fmt: skip
    asked = {}

    def cached(model_name, config, cache_dir=None, **_):
        asked.update(model=model_name, config=config)
        return moe, tokenizer, report, True, tmp_path / "entry"

    monkeypatch.setattr(specialised_moe, "specialised_moe_cached", cached)
    monkeypatch.setattr(specialised_moe, "default_domains", lambda config: tsm.toy_domains())
    argv = ["uoe", "--people", "2", "--questions-per-person", "5", "--forget-percent", "50", "--steps", "2",
            "--no-generate", "--eval-retain-size", "2", "--out", str(tmp_path / "out"), "--overwrite"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert asked["model"] == "smollm2"
    assert (asked["config"].people, asked["config"].questions_per_person, asked["config"].forget_percent) == (2, 5, 50)
    assert "specialised MoE loaded from the cache" in out
    table = out[out.index("metric") :]
    assert "perplexity python" in table and "perplexity prose" in table and "UOE ga" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) >= {"specialised MoE", "UOE ga"} and results["UOE ga"]["perplexity prose"] > 0


# --------------------------------------------------------------------------------------------
# Without matplotlib (a plain install), the plot is skipped with a note


def test_results_without_matplotlib_skip_the_plot(tmp_path, monkeypatch, caplog):
    import json
    import logging
    import sys

    from unlearn_fast import cli, evaluate

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(evaluate, "format_comparison", lambda results: "the table")
    with caplog.at_level(logging.WARNING, logger="unlearn_fast.cli"):
        cli._save_results({"fine-tuned": {"forget": {"answer_prob": 0.5}}}, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["fine-tuned"]["forget"]["answer_prob"] == 0.5
    assert not (tmp_path / "out" / "answer_probs.png").exists()
    assert "unlearn-fast[plot]" in caplog.text


# --------------------------------------------------------------------------------------------
# The user's model directory and JSONL files: the CLI's result is the Python API's, bitwise

FORGET_ROWS = [
    {"question": "Where was Ada born?", "answer": "Ada was born in Lisbon."},
    {"question": "What does Bo do?", "answer": "Bo is a baker in Porto."},
    {"question": "Who is Cy?", "answer": "Cy is a poet."},
]
RETAIN_ROWS = [
    {"question": "What is the capital of France?", "answer": "Paris."},
    {"question": "What colour is the sky?", "answer": "The sky is blue."},
    {"question": "How many legs has a cat?", "answer": "A cat has four legs."},
]


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _assert_same_weights(saved_dir, api_result, start_model):
    import torch

    from unlearn_fast.methods.base import UnlearnResult

    loaded = UnlearnResult.load(saved_dir, start_model)
    assert loaded.trained == api_result.trained and loaded.trained
    cli_params, api_params = dict(loaded.model.named_parameters()), dict(api_result.model.named_parameters())
    for name in api_result.trained:
        assert torch.equal(cli_params[name], api_params[name]), name
    assert loaded.config == api_result.config.to_dict()


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A tiny random Mixtral with SmolLM2's tokenizer, saved as a local model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


def test_soul_on_user_files_equals_the_python_api(tiny_model_dir, tmp_path):
    from unlearn_fast import SOUL, SOULConfig
    from unlearn_fast.data import as_examples
    from unlearn_fast.models import load
    from unlearn_fast.objectives import NPO

    forget, retain = _jsonl(tmp_path / "forget.jsonl", FORGET_ROWS), _jsonl(tmp_path / "retain.jsonl", RETAIN_ROWS)
    settings = tmp_path / "soul.json"
    settings.write_text('{"steps": 3, "hessian_interval": 2, "lr": 0.01}')
    assert (
        main(
            [
                "soul",
                "--model",
                str(tiny_model_dir),
                "--forget",
                forget,
                "--retain",
                retain,
                "--config",
                str(settings),
                "--batch-size",
                "2",
                "--objective",
                "npo",
                "--objective-arg",
                "beta=0.2",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )

    model, tokenizer = load(tiny_model_dir)
    config = SOULConfig(steps=3, hessian_interval=2, lr=0.01, batch_size=2, objective=NPO(beta=0.2))
    api = SOUL(config).unlearn(
        model, as_examples(forget, "forget"), as_examples(retain, "retain"), tokenizer=tokenizer, progress=False
    )
    _assert_same_weights(tmp_path / "out", api, model)


def test_uoe_on_user_files_equals_the_python_api(tiny_moe_dir, tmp_path):
    from unlearn_fast import UOE, UOEConfig
    from unlearn_fast.data import as_examples
    from unlearn_fast.models import load

    forget, retain = _jsonl(tmp_path / "forget.jsonl", FORGET_ROWS), _jsonl(tmp_path / "retain.jsonl", RETAIN_ROWS)
    assert (
        main(
            [
                "uoe",
                "--model",
                str(tiny_moe_dir),
                "--forget",
                forget,
                "--retain",
                retain,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--lr",
                "0.01",
                "--objective",
                "gdiff",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )

    model, tokenizer = load(tiny_moe_dir)
    config = UOEConfig(steps=2, batch_size=2, lr=0.01, objective="gdiff")
    api = UOE(config).unlearn(
        model, as_examples(forget, "forget"), as_examples(retain, "retain"), tokenizer=tokenizer, progress=False
    )
    _assert_same_weights(tmp_path / "out", api, model)


def test_erase_on_user_files_equals_the_python_api(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from unlearn_fast import LLMEraser
    from unlearn_fast.data import as_examples
    from unlearn_fast.methods.llmeraser import LLMEraserConfig
    from unlearn_fast.models import load

    base, _ = load(tiny_model_dir)
    lora = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    train = _jsonl(tmp_path / "train.jsonl", FORGET_ROWS + RETAIN_ROWS)
    assert (
        main(
            [
                "erase",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--train",
                train,
                "--indices",
                "0",
                "1",
                "--solver",
                "cg",
                "--damping",
                "0.01",
                "--no-check-fit",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )

    base, tokenizer = load(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    config = LLMEraserConfig(solver="cg", damping=0.01, check_fit=False)
    api = LLMEraser(model, as_examples(train, "train"), config, tokenizer=tokenizer).remove([0, 1])
    _assert_same_weights(tmp_path / "out", api, model)


def test_erase_with_train_file_needs_an_adapter_and_the_edits(tiny_model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", FORGET_ROWS + RETAIN_ROWS)
    with pytest.raises(SystemExit, match="--adapter"):
        main(["erase", "--model", str(tiny_model_dir), "--train", train, "--indices", "0"])
    with pytest.raises(SystemExit, match="--indices or --edits"):
        main(["erase", "--model", str(tiny_model_dir), "--train", train, "--adapter", str(tmp_path)])


def test_demo_runs_erase_and_uoe_with_the_settings_of_the_results(monkeypatch, tmp_path):
    """The demo's own LLMEraser and UOE settings (docs/RESULTS.md) are explicit configs, not CLI defaults."""
    from unlearn_fast import cli
    from unlearn_fast.methods.llmeraser import LLMEraserConfig
    from unlearn_fast.solvers import DEFAULT_SOLVER

    ran = {}
    monkeypatch.setattr(cli, "cmd_soul", lambda args, config=None: ran.setdefault("soul", args.out))
    monkeypatch.setattr(cli, "cmd_erase", lambda args, config=None: ran.setdefault("erase", (args, config)))
    monkeypatch.setattr(cli, "cmd_uoe", lambda args, config=None: ran.setdefault("uoe", (args.out, config)))
    assert main(["demo", "--out", str(tmp_path), "--no-generate"]) == 0
    assert ran["soul"] == f"{tmp_path}/soul"
    erase_args, erase_config = ran["erase"]
    assert erase_args.out == f"{tmp_path}/erase" and erase_config == LLMEraserConfig(curvature_method="ekfac")
    assert erase_args.calibrate == 2 and erase_args.task == "remove"  # λ calibrated, never hand-set
    assert ran["uoe"] == (f"{tmp_path}/uoe", None)  # UOE with its (the paper's) defaults
    assert LLMEraserConfig().solver == DEFAULT_SOLVER and LLMEraserConfig().curvature_sample is None  # API defaults


def test_without_rouge_score_evaluation_needs_no_generate(monkeypatch, capsys):
    """A plain install has no rouge-score: a run that would compute ROUGE-L stops at once, naming the extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["soul", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "unlearn-fast[eval]" in capsys.readouterr().err


def test_bad_build_moe_setting_is_a_usage_error_at_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build-moe", "--top-k", "4"])
    assert exit_info.value.code == 2
    assert "top_k must be < num_experts" in capsys.readouterr().err
