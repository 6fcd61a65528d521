"""Every bad input of docs/ERRORS.md, one row each: the exception type and a message naming the problem.

Op rows run on every CPU backend (the checks sit before dispatch, but a backend that skipped
them would read out of bounds or return garbage). Rows whose input is legal but unusual (NaN
values, strides, empty tensors) check that the result is right instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_backends
from test_llmeraser import DATA, TOK, CharTokenizer, lora_model
from test_soul import batches, tiny_llama

from unlearn_fast import SOUL, SOULConfig
from unlearn_fast.backend import use_backend
from unlearn_fast.cli import main
from unlearn_fast.data import (
    QAExample,
    collate,
    encode_qa,
    load_qa_jsonl,
    make_batches,
    make_fictitious_facts,
    split_forget_retain,
)
from unlearn_fast.methods.llmeraser import LLMEraser
from unlearn_fast.objectives import make_objective
from unlearn_fast.ops import ce_curvature, sophia_update, token_logprob_sum, token_logprobs
from unlearn_fast.ops.solver_update import cg_update, damped_dots, xpay

BACKENDS = ["reference", *cpu_backends()]
NAN = float("nan")

# --- ops ---------------------------------------------------------------------------------------

H, W, Y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 1])


def _sophia(params=None, grads=None, exp_avgs=None, hessians=None, **scalars):
    params = params if params is not None else [torch.zeros(3)]
    fill = lambda given: given if given is not None else [torch.zeros(3)]  # noqa: E731
    settings = dict(lr=0.1, beta1=0.9, beta2=0.99, rho=0.04, bs=1.0, weight_decay=0.0) | scalars
    sophia_update(params, fill(grads), fill(exp_avgs), fill(hessians), **settings)


def _vec(n=3, dtype=torch.float64):
    return torch.ones(n, dtype=dtype)


_aliased = _vec()

OP_CASES = {
    # token_logprobs / token_logprob_sum
    "token_logprobs: integer hidden": (lambda: token_logprobs(H.long(), W, Y), TypeError, "share a float dtype"),
    "token_logprobs: hidden float32, weight float64": (
        lambda: token_logprobs(H, W.double(), Y),
        TypeError,
        "share a float dtype",
    ),
    "token_logprobs: 1-D weight": (lambda: token_logprobs(H, W[0], Y), ValueError, r"weight must be \[vocab"),
    "token_logprobs: hidden size mismatch": (
        lambda: token_logprobs(H, W[:, :3], Y),
        ValueError,
        "hidden size mismatch",
    ),
    "token_logprobs: labels shape mismatch": (
        lambda: token_logprobs(H, W, Y[:2]),
        ValueError,
        "must match hidden's leading",
    ),
    "token_logprobs: float labels": (lambda: token_logprobs(H, W, Y.float()), TypeError, "labels must be an integer"),
    "token_logprobs: label = vocab size": (
        lambda: token_logprobs(H, W, torch.tensor([0, 5, 1])),
        ValueError,
        r"labels must lie in \[0, 5\).*got \[5\]",
    ),
    "token_logprobs: negative label other than ignore_index": (
        lambda: token_logprobs(H, W, torch.tensor([0, -1, 1])),
        ValueError,
        r"labels must lie in \[0, 5\).*got \[-1\]",
    ),
    "token_logprobs: hidden on meta, weight on cpu": (
        lambda: token_logprobs(H.to("meta"), W, Y),
        ValueError,
        "must be on one device",
    ),
    "token_logprobs: empty vocabulary": (lambda: token_logprobs(H, W[:0], Y), ValueError, "vocabulary is empty"),
    "token_logprobs: bias of the wrong length": (
        lambda: token_logprobs(H, W, Y, torch.zeros(4)),
        ValueError,
        r"bias must be \[5\]",
    ),
    "token_logprobs: a list instead of a tensor": (
        lambda: token_logprobs(H.tolist(), W, Y),
        TypeError,
        "must be tensors",
    ),
    "token_logprob_sum: token_weights shape mismatch": (
        lambda: token_logprob_sum(H, W, Y, torch.ones(2)),
        ValueError,
        "token_weights .* must match labels",
    ),
    # ce_curvature
    "ce_curvature: no tangent": (lambda: ce_curvature(H, W), ValueError, "at least one of"),
    "ce_curvature: tangents disagree on probes": (
        lambda: ce_curvature(H, W, tangent_hidden=torch.randn(2, 3, 4), tangent_bias=torch.randn(3, 5)),
        ValueError,
        "disagree on the number of probes",
    ),
    "ce_curvature: tangent dtype differs from hidden": (
        lambda: ce_curvature(H, W, tangent_hidden=torch.randn(2, 3, 4, dtype=torch.float64)),
        TypeError,
        "tangent_hidden must be torch.float32",
    ),
    "ce_curvature: tangent on meta": (
        lambda: ce_curvature(H, W, tangent_hidden=torch.randn(2, 3, 4, device="meta")),
        TypeError,
        "on meta",
    ),
    "ce_curvature: tangent of the wrong shape": (
        lambda: ce_curvature(H, W, tangent_hidden=torch.randn(2, 4, 3)),
        ValueError,
        r"must be \[probes, 3, 4\]",
    ),
    "ce_curvature: token_weights shape mismatch": (
        lambda: ce_curvature(H, W, tangent_bias=torch.randn(1, 5), token_weights=torch.ones(4)),
        ValueError,
        "token_weights .* must match",
    ),
    "ce_curvature: empty vocabulary": (
        lambda: ce_curvature(H, W[:0], tangent_hidden=torch.randn(2, 3, 4)),
        ValueError,
        "vocabulary is empty",
    ),
    "ce_curvature: hidden on meta": (
        lambda: ce_curvature(H.to("meta"), W, tangent_bias=torch.randn(1, 5)),
        TypeError,
        "share a float dtype and a device",
    ),
    # sophia_update
    "sophia_update: negative lr": (lambda: _sophia(lr=-1.0), ValueError, "lr must be a finite float >= 0"),
    "sophia_update: NaN lr": (lambda: _sophia(lr=NAN), ValueError, "lr must be a finite float >= 0"),
    "sophia_update: beta1 = 1": (lambda: _sophia(beta1=1.0), ValueError, r"beta1 must lie in \[0, 1\)"),
    "sophia_update: bs = 0": (lambda: _sophia(bs=0), ValueError, "bs must be finite and > 0"),
    "sophia_update: eps = 0": (lambda: _sophia(eps=0.0), ValueError, "eps must be finite and > 0"),
    "sophia_update: negative weight_decay": (lambda: _sophia(weight_decay=-0.1), ValueError, "weight_decay must be"),
    "sophia_update: float64 grads for float32 params": (
        lambda: _sophia(grads=[torch.zeros(3, dtype=torch.float64)]),
        TypeError,
        r"grads\[0\] is torch.float64 but must be torch.float32",
    ),
    "sophia_update: bfloat16 state for bfloat16 params": (
        lambda: _sophia(
            params=[torch.zeros(3, dtype=torch.bfloat16)],
            grads=[torch.zeros(3, dtype=torch.bfloat16)],
            exp_avgs=[torch.zeros(3, dtype=torch.bfloat16)],
        ),
        TypeError,
        r"exp_avgs\[0\] is torch.bfloat16 but must be torch.float32",
    ),
    "sophia_update: state of another shape": (
        lambda: _sophia(hessians=[torch.zeros(4)]),
        ValueError,
        r"hessians\[0\] has shape \(4,\)",
    ),
    "sophia_update: non-contiguous params": (
        lambda: _sophia(
            params=[torch.zeros(3, 2).t()],
            grads=[torch.zeros(2, 3)],
            exp_avgs=[torch.zeros(2, 3)],
            hessians=[torch.zeros(2, 3)],
        ),
        ValueError,
        r"params\[0\] must be contiguous",
    ),
    "sophia_update: lists of different lengths": (
        lambda: _sophia(grads=[torch.zeros(3), torch.zeros(3)]),
        ValueError,
        "must have the same length",
    ),
    "sophia_update: integer params": (
        lambda: _sophia(params=[torch.zeros(3, dtype=torch.long)]),
        TypeError,
        "params must be float32, float64",
    ),
    "sophia_update: grads on meta": (
        lambda: _sophia(grads=[torch.zeros(3, device="meta")]),
        ValueError,
        r"grads\[0\] is on meta",
    ),
    # solver updates
    "cg_update: NaN alpha": (
        lambda: cg_update(_vec(), _vec(), _vec(), _vec(), NAN),
        ValueError,
        "coefficient must be a finite float",
    ),
    "damped_dots: bool damping": (
        lambda: damped_dots(_vec(), _vec(), None, True),
        ValueError,
        "coefficient must be a finite float",
    ),
    "cg_update: x and r the same tensor": (
        lambda: cg_update(_aliased, _aliased, _vec(), _vec(), 1.0),
        ValueError,
        "x and r must be different tensors",
    ),
    "xpay: float16 vectors": (
        lambda: xpay(_vec(dtype=torch.float16), _vec(dtype=torch.float16), 1.0),
        TypeError,
        "float32 or float64",
    ),
    "xpay: shapes [2, 3] and [6]": (
        lambda: xpay(torch.ones(2, 3, dtype=torch.float64), _vec(6), 1.0),
        ValueError,
        r"r has shape \(6,\), p \(2, 3\)",
    ),
    "damped_dots: non-contiguous vector": (
        lambda: damped_dots(_vec(), torch.ones(3, 2, dtype=torch.float64)[:, 0], None, 1.0),
        ValueError,
        "contiguous",
    ),
    "cg_update: a vector on meta": (
        lambda: cg_update(_vec(), _vec().to("meta"), _vec(), _vec(), 1.0),
        TypeError,
        "on meta",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES)
def test_op_rejects(case, backend):
    call, error, message = OP_CASES[case]
    with use_backend(backend), pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_accepts_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=g).t()
    weight = torch.randn(4, 5, dtype=torch.float64, generator=g).t()
    with use_backend(backend):
        strided = token_logprobs(hidden, weight, Y)
        dense = token_logprobs(hidden.contiguous(), weight.contiguous(), Y)
        tangent = torch.randn(4, 3, 2, dtype=torch.float64, generator=g).permute(2, 1, 0)
        curv_strided = ce_curvature(hidden, weight, tangent_hidden=tangent).hidden
        curv_dense = ce_curvature(hidden.contiguous(), weight.contiguous(), tangent_hidden=tangent.contiguous()).hidden
    # Equal up to rounding: the reference multiplies the strided tensors as they are (another BLAS path).
    torch.testing.assert_close(strided.logp, dense.logp)
    torch.testing.assert_close(curv_strided, curv_dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_nan_stays_in_its_token_or_coordinate(backend):
    hidden = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hidden[0, 1] = NAN
    weight = W.double()
    with use_backend(backend):
        out = token_logprobs(hidden, weight, Y)
        clean = token_logprobs(hidden[1:], weight, Y[1:])
        params, grads = [torch.zeros(3)], [torch.tensor([NAN, 1.0, -1.0])]
        sophia_update(
            params,
            grads,
            [torch.zeros(3)],
            [torch.zeros(3)],
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            rho=0.04,
            bs=1.0,
            weight_decay=0.0,
        )
    assert out.logp[0].isnan() and out.lse[0].isnan()
    torch.testing.assert_close(out.logp[1:], clean.logp)  # other row counts may take another BLAS path
    assert params[0][0].isnan() and torch.isfinite(params[0][1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_zero_tokens_give_empty_results(backend):
    with use_backend(backend):
        out = token_logprobs(H[:0], W, Y[:0])
        curvature = ce_curvature(H[:0], W, tangent_hidden=torch.randn(2, 0, 4), need_weight=True)
    assert out.logp.shape == (0,) and out.lse.shape == (0,)
    assert curvature.hidden.shape == (2, 0, 4) and torch.equal(curvature.weight, torch.zeros(2, 5, 4))


# --- SOUL --------------------------------------------------------------------------------------


def _model_with(value: float):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = value
    return model


def _unlabelled():
    batch = batches(1, 1)[0]
    return [{**batch, "labels": torch.full_like(batch["labels"], -100)}]


SOUL_CASES = {
    "SOUL: lr = 0": (lambda: SOULConfig(lr=0.0), ValueError, "lr must be a finite number > 0"),
    "SOUL: steps = 0": (lambda: SOUL(steps=0), ValueError, "steps must be an integer >= 1"),
    "SOUL: negative batch_size": (lambda: SOUL(batch_size=-1), ValueError, "batch_size must be an integer >= 1"),
    "SOUL: max_grad_norm = 0": (lambda: SOUL(max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
    "SOUL: negative weight_decay": (lambda: SOUL(weight_decay=-1.0), ValueError, "weight_decay must be >= 0"),
    "SOUL: unknown estimator": (lambda: SOUL(estimator="fisher"), ValueError, "estimator must be one of"),
    "SOUL: unknown objective": (
        lambda: SOUL(objective="forget_all").unlearn(tiny_llama(), batches(1, 1), progress=False),
        ValueError,
        "unknown objective 'forget_all'",
    ),
    "SOUL: unknown objective argument": (
        lambda: SOUL(objective=make_objective("ga", gamma=1.0)),
        TypeError,
        r"takes no argument \['gamma'\]",
    ),
    "SOUL: betas outside [0, 1)": (
        lambda: SOUL(objective="ga", betas=(1.0, 0.99)).unlearn(tiny_llama(), batches(1, 1), progress=False),
        ValueError,
        "betas must be two numbers in",
    ),
    "SOUL: negative rho": (
        lambda: SOUL(objective="ga", rho=-1.0).unlearn(tiny_llama(), batches(1, 1), progress=False),
        ValueError,
        "rho must be finite and >= 0",
    ),
    "SOUL: checkpoint_every = 0": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), batches(1, 1), progress=False, checkpoint_every=0),
        ValueError,
        "checkpoint_every must be an integer >= 1",
    ),
    "SOUL: empty forget set": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), [], progress=False),
        ValueError,
        "forget set is empty",
    ),
    "SOUL: forget set given as a string": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), "forget this", progress=False),
        TypeError,
        "forget must be a list",
    ),
    "SOUL: forget items that are neither examples nor batches": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), [1, 2], tokenizer=TOK, progress=False),
        TypeError,
        r"forget\[0\] must be a QAExample or a \(question, answer\) pair",
    ),
    "SOUL: forget mixes batches and examples": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), [*batches(1, 1), ("q", "a")], tokenizer=TOK, progress=False),
        TypeError,
        "mixes collated batches",
    ),
    "SOUL: gdiff without retain data": (
        lambda: SOUL(objective="gdiff").unlearn(tiny_llama(), batches(1, 1), [], progress=False),
        ValueError,
        "needs retain data",
    ),
    "SOUL: batches without labels": (
        lambda: SOUL(objective="ga").unlearn(
            tiny_llama(), [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], progress=False
        ),
        ValueError,
        "need 'input_ids' and 'labels'",
    ),
    "SOUL: input_ids and labels of different shapes": (
        lambda: SOUL(objective="ga").unlearn(
            tiny_llama(),
            [{"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long)}],
            progress=False,
        ),
        ValueError,
        "must have one shape",
    ),
    "SOUL: a batch with no answer tokens": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), _unlabelled(), progress=False),
        ValueError,
        "no labelled .*answer.* tokens",
    ),
    "SOUL: examples without a tokenizer": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), [("q", "a")], progress=False),
        ValueError,
        "pass tokenizer=",
    ),
    "SOUL: refusal objective without a tokenizer": (
        lambda: SOUL(objective="po").unlearn(tiny_llama(), batches(1, 1), batches(1, 2), progress=False),
        ValueError,
        "'po' needs tokenizer=",
    ),
    "SOUL: tokenizer larger than the model's vocabulary": (
        # CharTokenizer emits ids up to 127; tiny_llama's embedding has 64 rows.
        lambda: SOUL(objective="ga").unlearn(tiny_llama(), [("question", "answer")], tokenizer=TOK, progress=False),
        ValueError,
        "embedding has 64 rows: the tokenizer does not match the model",
    ),
    "SOUL: NaN in the model's weights": (
        lambda: SOUL(objective="ga").unlearn(_model_with(NAN), batches(1, 1), progress=False),
        ValueError,
        r"NaN or inf in \['model.layers.0.mlp.down_proj.weight'\]",
    ),
    "SOUL: inf in the model's weights": (
        lambda: SOUL(objective="ga").unlearn(_model_with(math.inf), batches(1, 1), progress=False),
        ValueError,
        "NaN or inf in",
    ),
    "SOUL: model with no trainable parameters": (
        lambda: SOUL(objective="ga").unlearn(tiny_llama().requires_grad_(False), batches(1, 1), progress=False),
        ValueError,
        "no trainable parameters",
    ),
    "SOUL: not a model": (
        lambda: SOUL().unlearn("gpt2", batches(1, 1), progress=False),
        TypeError,
        "must be a torch.nn.Module",
    ),
}


@pytest.mark.parametrize("case", SOUL_CASES)
def test_soul_rejects(case):
    call, error, message = SOUL_CASES[case]
    with pytest.raises(error, match=message):
        call()


# --- LLMEraser ---------------------------------------------------------------------------------


class ShiftedTokenizer(CharTokenizer):
    """A tokenizer of a larger vocabulary than the model's (ids up to 227, embedding rows 128)."""

    def __len__(self) -> int:
        return 228

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [i + 100 if i > 3 else i for i in super().encode(text, add_special_tokens)]


def _nan_base():
    model = lora_model()
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.down_proj.weight[0, 0] = NAN
    return model


LLMERASER_CASES = {
    "LLMEraser: a model without LoRA": (
        lambda: LLMEraser(lora_model().base_model.model, DATA, tokenizer=TOK),
        TypeError,
        "needs a peft LoRA model",
    ),
    "LLMEraser: NaN damping": (
        lambda: LLMEraser(lora_model(), DATA, tokenizer=TOK, damping=NAN),
        ValueError,
        "damping must be a finite number",
    ),
    "LLMEraser: max_hvps = 0": (
        lambda: LLMEraser(lora_model(), DATA, tokenizer=TOK, max_hvps=0),
        ValueError,
        "max_hvps must be an integer >= 1",
    ),
    "LLMEraser: remove(tensor of floats)": (
        lambda: LLMEraser(lora_model(), DATA, tokenizer=TOK).remove(torch.tensor([1.0])),
        TypeError,
        "indices must be integers",
    ),
    "LLMEraser: tokenizer larger than the model's vocabulary": (
        lambda: LLMEraser(lora_model(), DATA[:4], tokenizer=ShiftedTokenizer()).remove([0]),
        ValueError,
        "embedding has 128 rows: the tokenizer does not match the model",
    ),
    "LLMEraser: NaN in the frozen base weights": (
        lambda: LLMEraser(_nan_base(), DATA[:4], tokenizer=TOK).remove([0]),
        FloatingPointError,
        "gradient is not finite",
    ),
    "LLMEraser: train_data rows of unknown keys": (
        lambda: LLMEraser(lora_model(), [{"q": "q", "a": "a"}], tokenizer=TOK),
        TypeError,
        r"train_data\[0\] has keys \['q', 'a'\]; expected a QAExample",
    ),
}


@pytest.mark.parametrize("case", LLMERASER_CASES)
def test_llmeraser_rejects(case):
    call, error, message = LLMERASER_CASES[case]
    with pytest.raises(error, match=message):
        call()


# --- data helpers ------------------------------------------------------------------------------


class NoEosTokenizer(CharTokenizer):
    eos_token_id = None


def _jsonl(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


DATA_CASES = {
    "make_fictitious_facts: 0 people": (
        lambda tmp: make_fictitious_facts(num_people=0),
        ValueError,
        r"num_people must be in \[1, ",
    ),
    "make_fictitious_facts: more questions than fact types": (
        lambda tmp: make_fictitious_facts(questions_per_person=99),
        ValueError,
        "questions_per_person must be in",
    ),
    "split_forget_retain: forget_percent = 100": (
        lambda tmp: split_forget_retain(make_fictitious_facts(4, 2), forget_percent=100),
        ValueError,
        r"forget_percent must be in \(0, 100\)",
    ),
    "split_forget_retain: one person only": (
        lambda tmp: split_forget_retain(make_fictitious_facts(1, 3)),
        ValueError,
        "at least 2 different people",
    ),
    "collate: an empty batch": (lambda tmp: collate([], 0), ValueError, "cannot collate an empty batch"),
    "encode_qa: max_length shorter than the prompt": (
        lambda tmp: encode_qa(TOK, ("a long question", "a"), max_length=4),
        ValueError,
        "leaving no room for the answer",
    ),
    "encode_qa: tokenizer without EOS": (
        lambda tmp: encode_qa(NoEosTokenizer(), ("q", "a")),
        ValueError,
        "tokenizer has no eos_token",
    ),
    "load_qa_jsonl: a record without the answer key": (
        lambda tmp: load_qa_jsonl(_jsonl(tmp, '{"question": "q"}\n')),
        ValueError,
        "line 1: missing key 'answer'",
    ),
    "load_qa_jsonl: a line that is not JSON": (
        lambda tmp: load_qa_jsonl(_jsonl(tmp, "question, answer\n")),
        ValueError,
        "line 1: not valid JSON",
    ),
    "make_batches: batch_size = 0": (
        lambda tmp: list(make_batches(TOK, [QAExample("q", "a", "a", ())], batch_size=0)),
        ValueError,
        "batch_size must be >= 1",
    ),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_helper_rejects(case, tmp_path):
    call, error, message = DATA_CASES[case]
    with pytest.raises(error, match=message):
        call(tmp_path)


# --- command line ------------------------------------------------------------------------------

CLI_CASES = {
    "unlearn-fast soul --steps 0": (["soul", "--steps", "0"], 2, "steps must be an integer >= 1"),
    "unlearn-fast soul --lr -1": (["soul", "--lr", "-1"], 2, "lr must be a finite number > 0"),
    "unlearn-fast demo --people 0": (["demo", "--people", "0"], 2, "num_people must be in"),
    "unlearn-fast finetune --finetune-lora-rank 0": (
        ["finetune", "--finetune-lora-rank", "0"],
        2,
        "lora_rank must be >= 1",
    ),
    "unlearn-fast soul --forget-percent 100": (["soul", "--forget-percent", "100"], 2, "forget_percent must be in"),
    "unlearn-fast score --model <missing dir>": (
        ["score", "hi", "--model", "/nonexistent/model"],
        1,
        "'/nonexistent/model' does not exist",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_rejects(case, capsys):
    argv, status, message = CLI_CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # fails at once: no fine-tuning or model load runs first
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.startswith("usage:" if status == 2 else "unlearn-fast: error:") and message in err, err
