"""LLMEraser on a tiny random Llama + LoRA (float64), against retraining without the edits.

The adapter is fitted to a stationary point of the full-batch fine-tuning loss (the answer-token
mean CE, as :func:`unlearn_fast.finetune.finetune` computes it) plus an L2 penalty (λ/2)‖Θ‖²,
so that the minimiser is well defined (without it a memorising adapter's weights grow for ever)
and the eraser's damping is exactly λ. The gold standard retrains from the same initialisation on
the edited data; its loss keeps the original normaliser (the token count of the original set),
so that it is the same per-example sum without (or with edited) examples, as the influence
formula assumes.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import random
from collections.abc import Sequence

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn_fast.data import QADataset, QAExample
from unlearn_fast.evaluate import sequence_logprobs
from unlearn_fast.hvp import hvp, make_loss_fn
from unlearn_fast.methods import llmeraser
from unlearn_fast.methods.base import UnlearnResult
from unlearn_fast.methods.llmeraser import EraseResult, LLMEraser, LLMEraserConfig, _progress_callback, calibrate
from unlearn_fast.models import hvp_safe
from unlearn_fast.solvers import IterationInfo

DT = torch.float64
LAM = 3e-2  # L2 penalty of the fine-tuning, hence the eraser's damping
Pair = tuple[str, str]


class CharTokenizer:
    """Just what unlearn_fast.data needs of a tokenizer: one token per ASCII character."""

    chat_template = None
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 2, 3

    def __len__(self) -> int:
        return 128

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) if 32 <= ord(c) < 128 else self.unk_token_id for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids


TOK = CharTokenizer()


def make_data(n: int = 32, seed: int = 0) -> list[Pair]:
    """Two groups of questions whose 3-letter answers come from different letter distributions:
    learnable structure plus per-example noise, so the fitted loss is finite and not zero."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        group = "xy"[i % 2]
        letters = "aaabbc" if group == "x" else "dddeef"
        data.append((f"q{group}{i}", "".join(rng.choice(letters) for _ in range(3))))
    return data


DATA = make_data()


def lora_model(target_modules: Sequence[str] = ("o_proj", "down_proj"), rank: int = 1) -> PeftModel:
    """The same random base and adapter initialisation on every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    base = LlamaForCausalLM(config).to(DT).eval()
    with torch.no_grad():  # a head with unit-scale rows, so that the adapter can fit peaked answers
        base.lm_head.weight.normal_(0, 1)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0)
    return get_peft_model(base, lora)


def several_module_model() -> PeftModel:
    """Rank 2 on three modules, B off zero (where the curvature is degenerate); not fitted."""
    model = lora_model(("q_proj", "v_proj", "down_proj"), rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def adapter(model: PeftModel) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_adapter(model: PeftModel) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in adapter(model)])


def full_batch(data: Sequence[Pair]) -> dict[str, torch.Tensor]:
    dataset = QADataset(TOK, data)
    return dataset.collate([dataset[i] for i in range(len(dataset))])


def answer_tokens(data: Sequence[Pair]) -> int:
    return int((full_batch(data)["labels"][:, 1:] != -100).sum())


def objective(model: PeftModel, data: Sequence[Pair], normaliser: int) -> torch.Tensor:
    scores = sequence_logprobs(model, full_batch(data))
    return -scores.sum_logp.sum() / normaliser + LAM / 2 * sum((p**2).sum() for p in adapter(model))


def fit(data: Sequence[Pair], normaliser: int) -> PeftModel:
    """Full-batch Adam, then L-BFGS to a stationary point (deterministic)."""
    model = lora_model()
    params = adapter(model)
    adam = torch.optim.Adam(params, lr=3e-2)
    for _ in range(150):
        adam.zero_grad()
        objective(model, data, normaliser).backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=400,
        tolerance_grad=1e-10,
        tolerance_change=0,
        history_size=100,
        line_search_fn="strong_wolfe",
    )

    def closure():
        lbfgs.zero_grad()
        loss = objective(model, data, normaliser)
        loss.backward()
        return loss

    lbfgs.step(closure)
    grad = torch.autograd.grad(objective(model, data, normaliser), params)
    assert torch.cat([g.reshape(-1) for g in grad]).norm() < 2e-3
    for p in params:
        p.grad = None
    return model.eval()


def mean_loss(model: PeftModel, pairs: Sequence[Pair]) -> float:
    with torch.no_grad():
        scores = sequence_logprobs(model, full_batch(pairs))
    return (-scores.sum_logp.sum() / scores.n_tokens.sum()).item()


def gap_closed(original: PeftModel, erased: PeftModel, retrained: PeftModel, pairs: Sequence[Pair]) -> float:
    """The fraction of the original -> retrained change of the pairs' loss that the eraser makes."""
    before, after, gold = (mean_loss(m, pairs) for m in (original, erased, retrained))
    return (after - before) / (gold - before)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's waiting makes them
    up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted() -> PeftModel:
    return fit(DATA, answer_tokens(DATA))


def eraser(model: PeftModel, **kwargs) -> LLMEraser:
    options = dict(tokenizer=TOK, damping=LAM, tol=1e-5, examples_per_pass=32)
    return LLMEraser(model, DATA, **{**options, **kwargs})


# --- accuracy against retraining --------------------------------------------------------------


@pytest.mark.parametrize(
    "removed, curvature, curvature_data",
    [
        ([3, 11], "gauss_newton", "train"),
        ([0, 17], "hessian", "train"),
        ([0, 17], "gauss_newton", "edited"),
    ],
)
def test_removal_moves_toward_retraining(fitted, removed, curvature, curvature_data):
    retrained = fit([pair for i, pair in enumerate(DATA) if i not in removed], answer_tokens(DATA))
    # CG: the fewest passes over 32 examples (see test_finite_sum_solvers_and_cg_agree).
    result = eraser(fitted, curvature=curvature, curvature_data=curvature_data, solver="cg").remove(removed)
    assert isinstance(result, EraseResult) and result.model is not fitted
    assert 0.5 <= gap_closed(fitted, result.model, retrained, [DATA[i] for i in removed]) <= 1.5
    # In parameter space too (the L2 penalty fixes LoRA's A/B scale, so distances mean something).
    gold = flat_adapter(retrained)
    assert (flat_adapter(result.model) - gold).norm() < 0.9 * (flat_adapter(fitted) - gold).norm()

    report = result.report
    assert (report.task, report.indices, report.n, report.dim) == ("remove", removed, 32, 80)
    assert report.converged and report.residual <= 1e-5 and report.residual_history[-1] == report.residual
    assert report.hvps > 0 and report.iterations > 0 and report.delta_norm > 0 and report.rhs_norm > 0
    assert (report.damping, report.curvature, report.curvature_data, report.solver) == (
        LAM,
        curvature,
        curvature_data,
        "cg",
    )
    assert report.train_grad_ratio < 0.1  # fitted (up to the L2 penalty's λΘ̂)
    assert report.wall_time_s >= report.solve_time_s > 0


@pytest.mark.parametrize(
    "task, edits",
    [
        ("modify_queries", {3: "qx3", 10: "qy10"}),  # questions that point to the other letter group
        ("correct_responses", {3: "aab", 10: "dde"}),  # answers from the other letter group
    ],
)
def test_edits_move_toward_retraining(fitted, task, edits):
    field = 0 if task == "modify_queries" else 1
    edited = [
        tuple(edits[i] if i in edits and k == field else s for k, s in enumerate(pair)) for i, pair in enumerate(DATA)
    ]
    retrained = fit(edited, answer_tokens(DATA))
    result = getattr(eraser(fitted, solver="cg"), task)(edits)
    assert result.report.task == task and result.report.converged
    assert 0.5 <= gap_closed(fitted, result.model, retrained, [edited[i] for i in edits]) <= 1.5


def test_finite_sum_solvers_and_cg_agree():
    # The default (svrg) and subsample_fcg find the same step as full-sum CG.
    model = several_module_model()
    steps = []
    for solver in ("svrg", "subsample_fcg", "cg"):
        result = LLMEraser(
            model, DATA[:12], tokenizer=TOK, solver=solver, damping=0.1, tol=1e-6, examples_per_pass=12
        ).remove([6])
        assert result.report.solver == solver and result.report.converged
        steps.append(flat_adapter(result.model) - flat_adapter(model))
    assert max((step - steps[-1]).norm() for step in steps[:-1]) <= 1e-4 * steps[-1].norm()


def test_indefinite_hessian_raises_the_damping():
    # Away from a minimum the exact Hessian has negative eigenvalues larger than a tiny damping:
    # the solver must say so and solve a damped system that is positive definite, never diverge.
    er = LLMEraser(
        several_module_model(), DATA[:12], tokenizer=TOK, curvature="hessian", solver="cg", damping=1e-6, tol=1e-6
    )
    with pytest.warns(UserWarning, match="raised the damping"):
        result = er.remove([3])
    report = result.report
    assert report.solver_info["negative_curvature_detected"] and report.damping > 1e-6
    assert report.damping > -report.solver_info["lambda_min_estimate"]
    assert report.converged and torch.isfinite(torch.tensor(report.delta_norm))


# --- the operator and gradients ---------------------------------------------------------------


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_operator_is_the_per_example_mean(curvature):
    model = several_module_model()
    data = DATA[:7] + [("a longer question", "with a longer answer")]  # uneven lengths: padding
    er = LLMEraser(model, data, tokenizer=TOK, curvature=curvature, examples_per_pass=3)
    op = er.operator
    assert op.n == 8 and op.dim == sum(p.numel() for p in adapter(model)) and len(er.parameter_names) == 6
    vectors = torch.randn(2, op.dim, dtype=DT, generator=torch.Generator().manual_seed(0))

    def reference(pairs):  # hvp of the answer-token mean CE of one padded batch of pairs
        with hvp_safe(model):
            loss, params = make_loss_fn(model, full_batch(pairs))
            sizes = [p.numel() for p in params.values()]
            shaped = {n: v.reshape(2, *params[n].shape) for n, v in zip(params, vectors.split(sizes, dim=1))}
            out = hvp(loss, params, shaped, curvature=curvature)
        return torch.cat([t.reshape(2, -1) for t in out.values()], dim=1)

    # "token" weighting: (1/n) Σ_i H_i is the Hessian of the token-mean CE of the whole set.
    # Chunks pad differently from one batch, and RMSNorm computes in float32: ~1e-7 relative.
    want = reference(data)
    close = dict(rtol=2e-6, atol=2e-6 * want.abs().max().item())
    torch.testing.assert_close(op.hvp_fn(vectors, None), want, **close)
    torch.testing.assert_close(op.hvp_fn(vectors[0], None), want[0], **close)
    # A minibatch: the mean of H_i, each L(z_i) = (T_i / T̄) · (its own answer-token mean CE).
    mean_tokens = answer_tokens(data) / len(data)
    want = sum(answer_tokens([data[i]]) / mean_tokens * reference([data[i]]) for i in (1, 7)) / 2
    torch.testing.assert_close(op.hvp_fn(vectors, [1, 7]), want, **close)
    # "example" weighting: each example's own mean CE.
    er = LLMEraser(model, data, tokenizer=TOK, curvature=curvature, loss_weighting="example")
    want = (reference([data[1]]) + reference([data[7]])) / 2
    torch.testing.assert_close(er.operator.hvp_fn(vectors, [1, 7]), want, **close)


def test_edited_curvature_drops_removed_and_adds_new_examples():
    model = several_module_model()
    er = LLMEraser(model, DATA[:6], tokenizer=TOK, examples_per_pass=4)
    vectors = torch.randn(3, er.dim, dtype=DT, generator=torch.Generator().manual_seed(1))
    full = er.operator.hvp_fn(vectors, None)
    close = dict(rtol=2e-6, atol=2e-6 * full.abs().max().item())  # RMSNorm computes in float32
    label = "edited train_data"
    # H over the edited set = H − (1/n) Σ_S H(z) + (1/n) Σ_S H(z'); each operator's hvp_fn is a mean.
    retained = er._operator([(e, label) for i, e in enumerate(er._encoded) if i not in (1, 4)])
    want = full - 2 / 6 * er.operator.hvp_fn(vectors, [1, 4])
    torch.testing.assert_close(retained.hvp_fn(vectors, None), want, **close)
    new = LLMEraser(model, [("qy1", "ddd")], tokenizer=TOK)._encoded[0]
    edited = er._operator([(e, label) for i, e in enumerate(er._encoded) if i != 1] + [(new, label)])
    want = full + (edited.hvp_fn(vectors, [5]) - er.operator.hvp_fn(vectors, [1])) / 6  # pool[5] is the new one
    torch.testing.assert_close(edited.hvp_fn(vectors, None), want, **close)


def test_train_gradient_is_the_full_batch_gradient():
    model = several_module_model()
    er = LLMEraser(model, DATA[:9], tokenizer=TOK, examples_per_pass=4)
    loss = sequence_logprobs(model, full_batch(DATA[:9]))
    loss = -loss.sum_logp.sum() / loss.n_tokens.sum()
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, adapter(model))])
    # (sequence_logprobs scores with the fused kernel; RMSNorm runs in float32: ~1e-8 apart.)
    assert er._train_gradient_norm() == pytest.approx(want.norm().item(), rel=1e-6)


# --- the caller's model, in-place edits, results -----------------------------------------------


def test_input_model_untouched_and_inplace(fitted):
    model = copy.deepcopy(fitted).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    er = eraser(model, solver="cg")
    result = er.remove([5])
    assert result.model is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == attention

    moved = [k for k, v in result.model.state_dict().items() if not torch.equal(v, state[k])]
    assert moved and all("lora_" in k for k in moved)
    again = er.remove([5], inplace=True)
    assert again.model is model
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-12)


def test_result_saves_and_loads(fitted, tmp_path):
    er = eraser(fitted, solver="cg", solver_options={"callback": lambda info: None})  # a function: not saved
    result = er.remove([2], progress=False)
    assert isinstance(result, UnlearnResult) and result.method == "llmeraser" and result.config is er.config
    assert result.trained == er.parameter_names and result.wall_time_s == result.report.wall_time_s
    assert result.metrics["residual"] == result.report.residual and result.metrics["task"] == "remove"
    assert [h["residual"] for h in result.history] == result.report.residual_history
    assert [h["iteration"] for h in result.history] == list(range(len(result.history)))
    assert result.history[-1]["hvps"] == result.report.hvps

    path = result.save(tmp_path / "x")
    assert path == tmp_path / "x" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp dirs left
    loaded = UnlearnResult.load(path, fitted)
    assert loaded.trained == result.trained and loaded.metrics["residual"] == result.report.residual
    for name, p in result.model.named_parameters():
        assert torch.equal(loaded.model.get_parameter(name), p), name
    assert "callback" not in loaded.config["solver_options"]
    assert LLMEraserConfig.from_dict(loaded.config) == dataclasses.replace(er.config, solver_options={})
    saved_report = json.loads((path / "result.json").read_text())["report"]
    assert saved_report["residual_history"] == result.report.residual_history

    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save(path)
    dataclasses.replace(result, model=fitted).save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    loaded = UnlearnResult.load(path, result.model)
    for name, p in fitted.named_parameters():
        assert torch.equal(loaded.model.get_parameter(name), p), name


def test_config_holds_the_settings():
    model = lora_model()
    er = LLMEraser(model, DATA[:4], tokenizer=TOK, solver="cg", damping=1e-2)
    assert er.config == LLMEraserConfig(solver="cg", damping=1e-2)
    er = LLMEraser(model, DATA[:4], LLMEraserConfig(solver="cg", seed=3), tokenizer=TOK, damping=1)  # overrides
    assert er.config == LLMEraserConfig(solver="cg", seed=3, damping=1.0) and isinstance(er.config.damping, float)
    assert LLMEraserConfig.from_dict(er.config.to_dict()) == er.config
    options = {"inner_iters": 5}
    config = LLMEraserConfig(solver_options=options)
    options["inner_iters"] = 6  # the frozen config holds its own copy
    assert config.solver_options == {"inner_iters": 5}
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['dampnig'\]"):
        LLMEraser(model, DATA[:4], tokenizer=TOK, dampnig=1.0)
    with pytest.raises(TypeError, match="LLMEraserConfig.from_dict"):
        LLMEraser(model, DATA[:4], {"solver": "cg"}, tokenizer=TOK)
    with pytest.raises(ValueError, match="LLMEraserConfig: hvp_method must be one of"):
        LLMEraserConfig(hvp_method="finite_differences")


def test_progress_bar_and_log(caplog, capsys):
    er = LLMEraser(several_module_model(), DATA[:6], tokenizer=TOK, solver="cg", damping=1.0, check_fit=False)
    with caplog.at_level(logging.INFO, logger="unlearn_fast.methods.llmeraser"):
        result = er.remove([0])
    assert "LLMEraser remove (cg)" in capsys.readouterr().err
    assert "LLMEraser remove: 1 of 6 examples edited" in caplog.text
    er.remove([0], progress=False)
    assert capsys.readouterr().err == ""

    # The bar follows the HVPs used (after a resume: plus the saved run's) and chains the user's callback.
    seen = []
    bar = tqdm(total=None, file=io.StringIO())
    callback = _progress_callback(bar, 10, seen.append)
    for hvps in (6, 12):
        info = IterationInfo(iteration=1, x=torch.zeros(1), relative_residual=0.5, hvps_used=hvps, damping=1.0)
        assert callback(info) is None
        assert bar.n == 10 + hvps
    assert len(seen) == 2 and result.report.converged


# --- errors -----------------------------------------------------------------------------------


def test_bad_models():
    with pytest.raises(TypeError, match="PeftModel"):
        LLMEraser(lora_model().base_model.model, DATA, tokenizer=TOK)
    frozen = lora_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA"):
        LLMEraser(frozen, DATA, tokenizer=TOK)
    extra = lora_model()
    extra.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not LoRA adapters"):
        LLMEraser(extra, DATA, tokenizer=TOK)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tokenizer": None}, ValueError, "tokenizer="),
        ({"solver": "newton"}, ValueError, "solver must be"),
        ({"solver": "cg", "batch_size": 4}, ValueError, "does not apply"),
        ({"curvature": "fisher"}, ValueError, "curvature must be"),
        ({"loss_weighting": "sequence"}, ValueError, "loss_weighting"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"tol": 0}, ValueError, "tol"),
        ({"examples_per_pass": 0}, ValueError, "examples_per_pass"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        LLMEraser(lora_model(), DATA, **{"tokenizer": TOK, **kwargs})


@pytest.mark.parametrize(
    "train_data, error, match",
    [
        ([], ValueError, "empty"),
        ("question", TypeError, "list of QAExample"),
        ([("q", "a"), ("only a question",)], TypeError, r"train_data\[1\]"),
        ([("q", "a"), {"question": "q"}], TypeError, r"train_data\[1\]"),
    ],
)
def test_bad_train_data(train_data, error, match):
    with pytest.raises(error, match=match):
        LLMEraser(lora_model(), train_data, tokenizer=TOK)


def test_bad_edits():
    er = LLMEraser(lora_model(), [QAExample("q1", "a1", "a1", ()), ("q2", "a2"), ("q3", "a3")], tokenizer=TOK)
    cases = [
        (lambda: er.remove([]), ValueError, "no examples"),
        (lambda: er.remove([0, 3]), ValueError, r"\[3\] are out of range"),
        (lambda: er.remove([-1]), ValueError, "out of range"),
        (lambda: er.remove([1, 1]), ValueError, "more than once"),
        (lambda: er.remove([0, 1, 2]), ValueError, "every training example"),
        (lambda: er.remove(1), TypeError, "list of train_data indices"),
        (lambda: er.remove([0.0]), TypeError, "integers"),
        (lambda: er.modify_queries([0]), TypeError, "dict"),
        (lambda: er.modify_queries({5: "new"}), ValueError, "out of range"),
        (lambda: er.modify_queries({0: ""}), ValueError, "non-empty string"),
        (lambda: er.modify_queries({0: "q1"}), ValueError, "equals the current"),
        (lambda: er.correct_responses({1: "a2"}), ValueError, "equals the current"),
        (lambda: er.correct_responses({}), ValueError, "no examples"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_nan_gradient_is_an_error():
    model = several_module_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not finite \(in a pass over .*train_data\[0\]"):
        LLMEraser(model, DATA[:4], tokenizer=TOK, examples_per_pass=2).remove([0])


def test_unfitted_adapter_warns():
    # An adapter that never saw train_data: its training-loss gradient is as large as the edit's.
    er = LLMEraser(several_module_model(), DATA[:6], tokenizer=TOK, solver="cg", damping=1.0)
    with pytest.warns(UserWarning, match="assumes a fitted adapter"):
        result = er.remove([0])
    assert result.report.train_grad_ratio > 0.5


def test_curvature_sample_is_a_reweighted_subsample(fitted):
    # H estimated on the edited examples plus m of the others: (1/n)[Σ_S H_i + ((n − |S|)/m) Σ_sample H_j].
    sampled = eraser(fitted, solver="cg", curvature_sample=12, seed=3, check_fit=False).remove([3, 11])
    full = eraser(fitted, solver="cg", curvature_sample=None).remove([3, 11])
    assert sampled.report.curvature_examples == 14 and full.report.curvature_examples == 32
    assert math.isnan(sampled.report.train_grad_ratio) and full.report.train_grad_ratio < 0.1
    others = [i for i in range(32) if i not in (3, 11)]
    keep = [others[j] for j in sorted(torch.randperm(30, generator=torch.Generator().manual_seed(3))[:12].tolist())]
    er = eraser(fitted)
    operator = er._operator([(er._encoded[i], str(i)) for i in [3, 11, *keep]], [1 / 32] * 2 + [30 / (12 * 32)] * 12)
    step = flat_adapter(sampled.model) - flat_adapter(fitted)
    rhs = er._gradient([er._term(er._encoded[i], 1.0, str(i)) for i in (3, 11)]) / 32
    residual = operator.hvp_fn(step, None) + LAM * step - rhs
    assert residual.norm() <= 1e-4 * rhs.norm()
    # The sampled step still moves the removed examples' loss most of the way (n = 32, m = 12).
    retrained = fit([pair for i, pair in enumerate(DATA) if i not in (3, 11)], answer_tokens(DATA))
    assert 0.5 <= gap_closed(fitted, sampled.model, retrained, [DATA[3], DATA[11]]) <= 1.5


def test_an_interrupted_solve_resumes_from_its_checkpoint(fitted, tmp_path):
    """Interrupted mid-solve: the model is untouched; the same call resumes from the saved iterate
    (no gradient pass: a resume never recomputes b) and lands on the uninterrupted ΔΘ."""
    model = copy.deepcopy(fitted)
    before = flat_adapter(model)
    uninterrupted = eraser(model, solver="cg", tol=1e-10).remove([3, 11])

    def stop(info):
        if info.iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        eraser(model, solver="cg", tol=1e-10, solver_options={"callback": stop}).remove(
            [3, 11], inplace=True, checkpoint_dir=tmp_path, checkpoint_every=2
        )
    assert torch.equal(flat_adapter(model), before)
    saved = torch.load(tmp_path / "llmeraser_checkpoint.pt")
    assert saved["step"] == 2 and saved["hvps"] > 0

    resumed_eraser = eraser(model, solver="cg", tol=1e-10)
    resumed_eraser._gradient = None  # b comes from the checkpoint
    resumed = resumed_eraser.remove([3, 11], checkpoint_dir=tmp_path)
    torch.testing.assert_close(flat_adapter(resumed.model), flat_adapter(uninterrupted.model), rtol=1e-6, atol=1e-9)
    assert resumed.report.converged and resumed.report.hvps > saved["hvps"]
    assert resumed.report.iterations > saved["step"]
    # It started from the saved iterate (residual below that of x = 0), not from scratch.
    assert resumed.report.residual_history[0] < 0.9 * uninterrupted.report.residual_history[0]

    with pytest.raises(ValueError, match="written by another run"):  # other edits, other settings
        eraser(model, solver="cg", tol=1e-10).remove([3, 12], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="setting damping"):
        eraser(model, solver="cg", tol=1e-10, damping=0.1).remove([3, 11], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="needs solver"):
        eraser(model, solver="lissa").remove([3, 11], checkpoint_dir=tmp_path)


def test_edit_many_equals_the_single_edits(fitted):
    # Removals, a query modification and a response correction in one block solve (shared batched
    # products) = one call each. The tiny model's RMSNorm computes in float32, so batched and single
    # products differ at ~1e-8 (measured 1.9e-8); the float64 linear algebra agrees to 1e-8 in
    # test_solvers.test_block_solve_equals_single_solves.
    requests = [("remove", [3, 11]), ("remove", [5]), ("modify_queries", {7: "What is it?"}),
                ("correct_responses", {0: "Nobody knows.", 20: "Unknown."})]  # fmt: skip
    er = eraser(fitted, solver="cg", tol=1e-11)
    block = er.edit_many(requests, progress=False)
    before = flat_adapter(fitted)
    for (task, arg), result in zip(requests, block):
        single = getattr(er, task)(arg, progress=False)
        want = flat_adapter(single.model) - before
        got = flat_adapter(result.model) - before
        assert ((got - want).norm() / want.norm()).item() <= 1e-6, task
        assert result.report.indices == sorted(arg) and result.report.task == task
        assert result.report.solver == "block_cg" and result.report.converged
    assert flat_adapter(er.model).equal(before)  # nothing in place
    removals = er.remove_many([[3, 11], [5]], progress=False)
    for a, b in zip(removals, block):  # the same solutions, from a block of two instead of four
        got, want = flat_adapter(a.model) - before, flat_adapter(b.model) - before
        assert ((got - want).norm() / want.norm()).item() <= 1e-6
    with pytest.raises(ValueError, match="curvature_data='train'"):
        eraser(fitted, curvature_sample=4).remove_many([[3]])
    with pytest.raises(ValueError, match="request 1"):
        er.remove_many([[1], [99]])
    with pytest.raises(ValueError, match="request 0.*equals the current one"):
        er.edit_many([("correct_responses", {0: er.train_data[0].answer})])
    with pytest.raises(ValueError, match="task must be one of"):
        er.edit_many([("forget", [1])])


def test_fit_check_tolerance_is_relative_to_b_whatever_n_over_s(fitted):
    # ‖∇R(Θ̂)‖/‖b‖ against a fixed tolerance: removing more examples (larger b) cannot hide a gradient.
    er = LLMEraser(several_module_model(), DATA[:6], tokenizer=TOK, solver="cg", damping=1.0)
    norm = er._train_gradient_norm()
    with pytest.warns(UserWarning, match="tolerance 0.5"):
        result = er.remove([0], progress=False)
    assert result.report.train_grad_ratio == pytest.approx(norm / result.report.rhs_norm)
    assert result.report.train_grad_ratio > llmeraser.FIT_TOLERANCE


def test_calibrate_picks_the_damping_that_matches_retraining_on_other_removals(fitted):
    def retrain(removed):
        retrained.append(sorted(removed))
        return fit([pair for i, pair in enumerate(DATA) if i not in removed], answer_tokens(DATA))

    retrained = []
    er = eraser(fitted, solver="cg", check_fit=False)
    grid = [1e-4, LAM, 10.0]
    found = calibrate(er, [3, 11], retrain, grid, count=2)
    assert found.damping in grid and retrained == found.sets and len(found.sets) == 2
    assert all(len(s) == 2 and not {3, 11} & set(s) for s in found.sets)  # drawn away from the evaluated
    # The middle of the grid (the adapter's own L2 penalty) beats both extremes against retraining.
    assert found.errors[found.damping] < min(found.errors[1e-4], found.errors[10.0]), found.errors
    assert found.damping == LAM


def test_calibrate_fits_a_fitted_curvature_once_and_refactors_it_per_damping(fitted, monkeypatch):
    """With curvature_method="fisher", every λ of the grid reuses one fit (its rows, refactored), and
    scores as an eraser whose curvature was fitted at that λ does."""
    fits = []
    real_fit = LLMEraser.fit_curvature
    monkeypatch.setattr(LLMEraser, "fit_curvature", lambda self: fits.append(self.config.damping) or real_fit(self))
    retrained = fit([pair for i, pair in enumerate(DATA) if i not in (0, 5)], answer_tokens(DATA))
    grid = [1e-3, LAM, 1.0]
    er = eraser(fitted, curvature_method="fisher", check_fit=False, damping=grid[0])
    found = calibrate(er, [3, 11], lambda removed: retrained, grid, sets=[[0, 5]])
    assert fits == [grid[0]]
    for lam in grid:
        alone = eraser(fitted, curvature_method="fisher", check_fit=False, damping=lam)
        assert found.errors[lam] == pytest.approx(
            calibrate(alone, [3, 11], lambda r: retrained, [lam], sets=[[0, 5]]).errors[lam], rel=1e-6
        )
    assert fits == [grid[0], *grid] and len(set(found.errors.values())) == 3


def test_with_damping_shares_the_fit_and_not_the_edits(fitted):
    """with_damping(λ) removes as an eraser fitted at λ does, without a new fit, and an in-place edit of
    one eraser leaves the other's training set and curvature alone."""
    er = eraser(fitted, curvature_method="fisher", check_fit=False, damping=1e-3)
    er.fit_curvature()
    other = er.with_damping(LAM)
    assert other.config.damping == LAM and er.config.damping == 1e-3 and other._curvature is not er._curvature
    alone = eraser(fitted, curvature_method="fisher", check_fit=False, damping=LAM)
    want = flat_adapter(alone.remove([3, 11], progress=False).model)
    assert torch.allclose(flat_adapter(other.remove([3, 11], progress=False).model), want, rtol=1e-6, atol=1e-12)
    copy_model = copy.deepcopy(fitted)
    editing = eraser(copy_model, curvature_method="fisher", check_fit=False, damping=LAM)
    editing.fit_curvature()
    kept = editing.with_damping(LAM)
    editing.remove([3], inplace=True, progress=False)
    assert kept._removed == set() and editing._removed == {3}
    assert len(kept._curvature.owners) > len(editing._curvature.owners)
    checked = eraser(fitted, curvature_method="fisher", damping=1e-3)
    checked.remove([3, 11], progress=False)  # the fit check's pass over the data, kept for every λ
    assert checked._train_grad is not None and checked.with_damping(LAM)._train_grad is checked._train_grad


def test_calibrate_refuses_sets_that_overlap_the_evaluated_removal(fitted):
    def never(removed):
        raise AssertionError("no retraining before the sets are checked")

    with pytest.raises(ValueError, match=r"contain \[11\].*disjoint"):
        calibrate(eraser(fitted, check_fit=False), [3, 11], never, [LAM], sets=[[0, 5], [11, 20]])
    with pytest.raises(ValueError, match="dampings"):
        calibrate(eraser(fitted, check_fit=False), [3, 11], never, [0.0], sets=[[0, 5]])
