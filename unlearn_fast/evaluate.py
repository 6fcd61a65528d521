"""TOFU-style evaluation of unlearning (Maini et al., 2024).

Per split (forget / retain / world facts) of a :class:`~unlearn_fast.data.FactsDataset`:

* answer probability: ``P(answer | question) ** (1 / n_tokens)``, the geometric-mean token
  probability, averaged over the split;
* ROUGE-L recall of greedy generations against the answer;
* truth ratio ``R``: mean length-normalised probability of the perturbed (wrong) answers over
  that of the paraphrased answer; ``max(0, 1 - R)`` is TOFU's utility score;
* MinK% membership-inference scores (Shi et al., 2024) and answer perplexity.

Aggregates: forget quality (KS-test p-value between the forget-split truth ratios of the
evaluated model and of a reference model trained on the retain set only) and model utility
(harmonic mean of the retain and world-facts metrics).

Every likelihood goes through :func:`~unlearn_fast.models.causal_lm.sequence_logprobs` (also
importable from here), which scores tokens with the fused :func:`~unlearn_fast.ops.token_logprobs`
op and never materialises the [tokens, vocab] logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import ks_2samp
from tqdm.auto import tqdm
from transformers import GenerationConfig

from unlearn_fast.data import (
    IGNORE_INDEX,
    FactsDataset,
    QAExample,
    collate,
    encode_prompt,
    encode_qa,
    pad_token_id_of,
)
from unlearn_fast.models.causal_lm import eval_mode, sequence_logprobs  # sequence_logprobs: public here too

SPLITS = ("forget", "retain", "world")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, so little compute is spent on padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _score(
    model: torch.nn.Module,
    tokenizer: Any,
    encoded: Sequence[Mapping[str, Any]],
    batch_size: int,
    progress: str | None = None,
) -> list[torch.Tensor]:
    """Per-sequence 1-D float tensors of the log-probs of their labelled tokens, in input order.

    ``progress``: the description of a progress bar over the batches; None shows none.
    """
    pad = pad_token_id_of(tokenizer)
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    batches = list(_length_sorted_batches([len(e["input_ids"]) for e in encoded], batch_size))
    with eval_mode(model):
        for ids in tqdm(batches, desc=progress, disable=progress is None, unit="batch", leave=False):
            batch = collate([encoded[i] for i in ids], pad)
            token_logp = sequence_logprobs(model, batch).token_logp.double().cpu()
            scored = batch["labels"][:, 1:] != IGNORE_INDEX
            for row, i in enumerate(ids):
                out[i] = token_logp[row][scored[row]]
    return out


def _score_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    max_length: int,
    progress: str | None = None,
) -> list[torch.Tensor]:
    """Answer-token log-probs of (question, answer) pairs (the answer ends with EOS)."""
    return _score(model, tokenizer, [encode_qa(tokenizer, p, max_length) for p in pairs], batch_size, progress)


def _check_nonempty(examples: Sequence[Any], what: str = "examples") -> None:
    if len(examples) == 0:
        raise ValueError(f"no {what} to evaluate (got an empty list)")


def _mean_logp(token_logp: torch.Tensor) -> float:
    return token_logp.mean().item()


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def answer_probability(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[QAExample],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> list[float]:
    """Per example, ``P(answer | question) ** (1 / n_tokens)``, in (0, 1]."""
    _check_nonempty(examples)
    scores = _score_answers(model, tokenizer, [(ex.question, ex.answer) for ex in examples], batch_size, max_length)
    return [math.exp(_mean_logp(s)) for s in scores]


def _truth_ratio(paraphrased_mean_logp: float, perturbed_mean_logps: Sequence[float]) -> float:
    # mean_i exp(l_i) / exp(l_para), in log space so tiny probabilities do not underflow.
    log_mean_perturbed = torch.tensor(perturbed_mean_logps, dtype=torch.float64).logsumexp(0).item()
    return math.exp(log_mean_perturbed - math.log(len(perturbed_mean_logps)) - paraphrased_mean_logp)


def _check_perturbed(examples: Sequence[QAExample], where: str = "") -> None:
    for i, ex in enumerate(examples):
        if not ex.perturbed_answers:
            raise ValueError(
                f"the truth ratio needs perturbed answers, but example {i}{where} "
                f"({ex.question!r}) has none; give every example at least one wrong answer"
            )


def truth_ratios(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[QAExample],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> list[float]:
    """Per example, ``R = mean_i P(perturbed_i)^(1/|perturbed_i|) / P(paraphrased)^(1/|paraphrased|)``.

    This is the definition of the TOFU paper (arithmetic mean over the perturbed answers); R < 1
    means the model prefers the correct paraphrase to the wrong answers.
    """
    _check_nonempty(examples)
    _check_perturbed(examples)
    pairs = [(ex.question, a) for ex in examples for a in (ex.paraphrased_answer, *ex.perturbed_answers)]
    means = iter([_mean_logp(s) for s in _score_answers(model, tokenizer, pairs, batch_size, max_length)])
    ratios = []
    for ex in examples:
        paraphrased = next(means)
        ratios.append(_truth_ratio(paraphrased, [next(means) for _ in ex.perturbed_answers]))
    return ratios


def truth_score(ratios: Sequence[float]) -> float:
    """TOFU's utility score of truth ratios: the mean of ``max(0, 1 - R)``, in [0, 1]."""
    _check_nonempty(ratios, "truth ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def forget_quality(truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]) -> float:
    """p-value of a two-sample KS test between forget-split truth ratios of two models.

    The reference is a model that never saw the forget set (TOFU's retain-only model): a high
    p-value means the unlearned model cannot be told apart from it.
    """
    _check_nonempty(truth_ratios, "truth ratios")
    _check_nonempty(reference_truth_ratios, "reference truth ratios")
    return float(ks_2samp(truth_ratios, reference_truth_ratios).pvalue)


@functools.cache
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer  # imports nltk (~1 s), so only when needed
    except ImportError as error:
        raise ImportError(
            "ROUGE-L needs rouge-score: pip install 'unlearn-fast[eval]' "
            "(or evaluate with generate=False, the command line's --no-generate)"
        ) from error

    # Stemming as in TOFU's evaluation.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generated: str, reference: str) -> float:
    """ROUGE-L recall: longest common subsequence of words over the reference's word count."""
    return _rouge_scorer().score(reference, generated)["rougeL"].recall


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to the questions, prompted as in training (:func:`~unlearn_fast.data.encode_prompt`).

    ``progress`` shows a progress bar over the batches (generation is the slow part of an evaluation).
    """
    _check_nonempty(questions, "questions")
    pad, eos = pad_token_id_of(tokenizer), tokenizer.eos_token_id
    # An explicit config, so the model's own defaults (sampling, temperature) cannot apply.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    device = model.get_input_embeddings().weight.device
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    answers = [""] * len(prompts)
    batches = list(_length_sorted_batches([len(p) for p in prompts], batch_size))
    with eval_mode(model):
        for ids in tqdm(batches, desc="generating answers", disable=not progress, unit="batch", leave=False):
            # Left padding, so every prompt ends where generation starts.
            width = max(len(prompts[i]) for i in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, i in enumerate(ids):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for row, i in enumerate(ids):
                new = out[row, width:].tolist()
                # Finished rows are filled with pad, which need not be a special token.
                if eos in new:
                    new = new[: new.index(eos)]
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers


def rouge_l_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[QAExample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> list[float]:
    """Per example, ROUGE-L recall of the model's greedy answer against the reference answer.

    ``progress`` shows a progress bar over the generation batches.
    """
    _check_nonempty(examples)
    generated = generate_answers(
        model,
        tokenizer,
        [ex.question for ex in examples],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    return [rouge_l_recall(g, ex.answer) for g, ex in zip(generated, examples)]


def mink_score(token_logp: Sequence[float] | torch.Tensor, k: float = 20) -> float:
    """Min-K% Prob: the mean of the ``k`` percent lowest token log-probs (at least one token).

    Higher means the text looks more familiar to the model, i.e. more likely trained on.
    """
    values = torch.as_tensor(token_logp, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("mink_score needs at least one token log-prob")
    if not 0 < k <= 100:
        raise ValueError(f"k is a percentage in (0, 100], got {k}")
    count = max(1, int(values.numel() * k / 100))
    return values.sort().values[:count].mean().item()


def mink_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members from non-members by score: P(member > non-member), ties 1/2.

    This is the Mann-Whitney U statistic over the number of pairs; 0.5 means no separation.
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.sort(np.asarray(nonmember_scores, dtype=np.float64).ravel())
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("mink_auc needs at least one member and one non-member score")
    if np.isnan(members).any() or np.isnan(nonmembers).any():
        raise ValueError("mink_auc got NaN scores")
    below = np.searchsorted(nonmembers, members, side="left")  # non-members strictly lower
    ties = np.searchsorted(nonmembers, members, side="right") - below
    return float((below + 0.5 * ties).sum() / (members.size * nonmembers.size))


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[str | QAExample],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> float:
    """``exp`` of the mean token negative log-likelihood over all items.

    A string is scored as a whole text (every token after the first); a :class:`QAExample` on
    its answer tokens given the question.
    """
    _check_nonempty(items, "texts")
    encoded = []
    for item in items:
        if isinstance(item, QAExample):
            encoded.append(encode_qa(tokenizer, item, max_length))
        else:
            ids = tokenizer.encode(item, add_special_tokens=True)[:max_length]
            encoded.append({"input_ids": ids, "labels": ids})
    scores = torch.cat(_score(model, tokenizer, encoded, batch_size))
    if scores.numel() == 0:
        raise ValueError("the texts have no token to predict (each is at most one token long)")
    return math.exp(-scores.mean().item())


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any is 0 (as TOFU's model utility)."""
    _check_nonempty(values, "values")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean needs non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# --------------------------------------------------------------------------------------------
# Full evaluation
# --------------------------------------------------------------------------------------------


def _evaluate_split(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[QAExample],
    split: str,
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    generate: bool,
    mink_k: float,
    progress: bool,
) -> tuple[dict[str, Any], list[float], list[float]]:
    """One split's metrics, its truth ratios and its MinK scores.

    The answer, its paraphrase and the perturbed answers of every example are scored in one pass.
    """
    _check_perturbed(examples, f" of the {split!r} split")
    groups = [(ex.answer, ex.paraphrased_answer, *ex.perturbed_answers) for ex in examples]
    pairs = [(ex.question, a) for ex, group in zip(examples, groups) for a in group]
    description = f"scoring {split}" if progress else None
    flat = iter(_score_answers(model, tokenizer, pairs, batch_size, max_length, description))
    scores = [[next(flat) for _ in group] for group in groups]

    answers = [s[0] for s in scores]
    answer_means = [_mean_logp(s) for s in answers]
    perturbed_means = [[_mean_logp(p) for p in s[2:]] for s in scores]
    ratios = [_truth_ratio(_mean_logp(s[1]), pert) for s, pert in zip(scores, perturbed_means)]
    minks = [mink_score(s, mink_k) for s in answers]
    # TOFU's probability for multiple-choice splits: the answer's share among all the choices.
    choice = [1.0 / (1.0 + sum(math.exp(p - a) for p in pert)) for a, pert in zip(answer_means, perturbed_means)]
    rouge = None
    if generate:
        rouge = float(
            np.mean(
                rouge_l_scores(
                    model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
                )
            )
        )
    answer_tokens = torch.cat(answers)
    result = {
        "n": len(examples),
        "answer_prob": float(np.mean(np.exp(answer_means))),
        "choice_prob": float(np.mean(choice)),
        "rouge_l": rouge,
        "truth_ratio": float(np.mean(ratios)),
        "truth_score": truth_score(ratios),
        "mink": float(np.mean(minks)),
        "ppl": math.exp(-answer_tokens.mean().item()),
    }
    return result, ratios, minks


def model_utility(retain: Mapping[str, Any], world: Mapping[str, Any]) -> float:
    """TOFU's model utility: harmonic mean of the retain and world-facts metrics.

    Retain contributes answer probability, ROUGE-L and truth score; world facts the same with
    the multiple-choice probability (``choice_prob``) in place of the answer probability, as in
    TOFU. ROUGE-L is left out when it was not computed (``None``), which makes the number not
    comparable with TOFU's.
    """
    values = [
        retain["answer_prob"],
        retain["rouge_l"],
        retain["truth_score"],
        world["choice_prob"],
        world["rouge_l"],
        world["truth_score"],
    ]
    return harmonic_mean([v for v in values if v is not None])


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: FactsDataset,
    *,
    reference_truth_ratios: Sequence[float] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    generate: bool = True,
    max_length: int = 256,
    mink_k: float = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on the forget, retain and world-facts splits of ``dataset``.

    Returns one dict per split (``"forget"``, ``"retain"``, ``"world"``) with ``n``,
    ``answer_prob``, ``choice_prob``, ``rouge_l`` (None unless ``generate``), ``truth_ratio``
    (mean R), ``truth_score`` (mean max(0, 1 - R)), ``mink`` (mean MinK score) and ``ppl``
    (answer perplexity), plus:

    * ``forget_quality``: KS p-value against ``reference_truth_ratios`` (None without them);
    * ``model_utility``: see :func:`model_utility`;
    * ``mink_auc``: MinK AUC with retain as members and forget as non-members: 0.5 while the
      forget set looks as trained-on as the retain set, towards 1 once it looks unseen;
    * ``forget_truth_ratios``: the per-example forget-split truth ratios. Evaluate the
      retain-only reference model first and pass these as its ``reference_truth_ratios``.

    The model is put in eval mode and restored afterwards; its weights are not touched.
    ``progress`` shows progress bars (on stderr) while each split is scored and answered.
    """
    splits = {"forget": dataset.forget, "retain": dataset.retain, "world": dataset.world_facts}
    for name, examples in splits.items():
        if not examples:
            raise ValueError(f"the {name!r} split of the dataset is empty")
    results: dict[str, Any] = {}
    ratios: dict[str, list[float]] = {}
    minks: dict[str, list[float]] = {}
    for name, examples in splits.items():
        results[name], ratios[name], minks[name] = _evaluate_split(
            model,
            tokenizer,
            examples,
            name,
            batch_size=batch_size,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            generate=generate,
            mink_k=mink_k,
            progress=progress,
        )
    results["forget_quality"] = (
        None if reference_truth_ratios is None else forget_quality(ratios["forget"], reference_truth_ratios)
    )
    results["model_utility"] = model_utility(results["retain"], results["world"])
    results["mink_auc"] = mink_auc(minks["retain"], minks["forget"])
    results["forget_truth_ratios"] = ratios["forget"]
    return results


_COLUMNS = ("n", "answer_prob", "choice_prob", "rouge_l", "truth_ratio", "truth_score", "mink", "ppl")
_AGGREGATES = ("forget_quality", "model_utility", "mink_auc")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def format_table(results: Mapping[str, Any]) -> str:
    """The splits of an :func:`evaluate` result as an aligned text table, then the aggregates."""
    rows = [["split", *_COLUMNS]]
    rows += [[name, *(_cell(results[name][c]) for c in _COLUMNS)] for name in SPLITS if name in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    label = max(len(a) for a in _AGGREGATES)
    lines += [f"{a.ljust(label)}  {_cell(results[a])}" for a in _AGGREGATES if a in results]
    return "\n".join(lines)


_COMPARED = (
    ("forget", "answer_prob"),
    ("forget", "rouge_l"),
    ("forget", "truth_ratio"),
    ("retain", "answer_prob"),
    ("retain", "rouge_l"),
    ("world", "choice_prob"),
)


def format_comparison(results_by_stage: Mapping[str, Mapping[str, Any]]) -> str:
    """Several :func:`evaluate` results side by side (e.g. before / after), one column per stage."""
    names = list(results_by_stage)
    rows = [["metric", *names]]
    rows += [
        [f"{split} {metric}", *(_cell(results_by_stage[n][split][metric]) for n in names)]
        for split, metric in _COMPARED
    ]
    # Extra numbers a command adds to every stage (e.g. "perplexity python" of the uoe command) follow.
    extras = [k for k, v in results_by_stage[names[0]].items() if k not in _AGGREGATES and isinstance(v, float)]
    rows += [[a, *(_cell(results_by_stage[n].get(a)) for n in names)] for a in (*_AGGREGATES, *extras)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )
