"""Unlearning through a Hugging Face ``Trainer``: any objective of :mod:`unlearn_fast.objectives`,
minimised with Sophia (SOUL) or the Trainer's own optimizer, in an existing Trainer setup.

    from transformers import TrainingArguments
    from unlearn_fast.hf_trainer import UnlearningTrainer
    from unlearn_fast.objectives import NPO

    args = TrainingArguments(output_dir="out", max_steps=20, per_device_train_batch_size=4, learning_rate=1e-4,
                             lr_scheduler_type="constant", report_to=[])
    trainer = UnlearningTrainer(model=model, args=args, processing_class=tokenizer, objective=NPO(beta=0.1),
                                forget_dataset=forget, retain_dataset=retain, sophia={"hessian_interval": 10})
    trainer.train()  # trainer.model is now unlearned; save_model, callbacks, logging work as usual

Data: ``forget_dataset`` / ``retain_dataset`` take what :func:`unlearn_fast.data.as_batches` takes
(QAExample, (question, answer) pairs, dict rows, a file, or collated batches, used as given); examples
are encoded with ``processing_class`` and collated ``per_device_train_batch_size`` at a time. An epoch
is one pass over the forget batches in a new random order (``data_seed``, else ``seed``), each paired
with the next batch of an endless, reshuffled cycle over the retain batches. ``train_dataset`` is not
taken; an ``eval_dataset`` of plain language-model batches is scored with the Trainer's usual loss.

The objective is prepared (NPO's reference log-probs, RMU's activations) once, with the model as it is
when ``train()`` is first called: before a ``resume_from_checkpoint`` loads the trained weights.

``sophia``: True (Sophia-G with its defaults), a dict of Sophia settings (``lr``, ``betas``, ``rho``,
``weight_decay``, ``estimator`` "gnb" | "empirical", ``hessian_interval``, ``eps``; ``lr`` and
``weight_decay`` default to the TrainingArguments'), or False: the Trainer's optimizer (``args.optim``,
AdamW by default), the first-order baseline. Sophia gets the Trainer's parameter groups (no decay on
biases and norms) and its lr scheduler. Trainer calls ``optimizer.step()`` bare, so two torch optimizer
step hooks, registered for the duration of ``train()``, do Sophia's per-step work: the pre-hook passes
``step(bs=...)``, the answer tokens of the step's batches (unless the Sophia has a fixed ``bs``, e.g.
``Sophia.soul_reference``); the post-hook, when :meth:`Sophia.hessian_due`, refreshes the Gauss-Newton
diagonal on the step's batches. A Sophia given in ``optimizers=`` (with ``sophia=False``) gets both too.

TrainingArguments: ``max_grad_norm`` clips the gradient before Sophia's step (as SOUL's default);
gradient accumulation divides each micro-batch's loss by the steps and Sophia's ``bs`` counts all of
them; ``gradient_checkpointing`` and mixed precision work (the Hessian refresh runs under the same
autocast); ``label_smoothing_factor`` and ``optim_args`` (with Sophia) are ignored by the objectives;
the model trains in ``train()`` mode (SOUL uses eval mode: same unless the model has dropout). One
process, one device: the objectives normalise their losses over ``torch.distributed`` ranks themselves,
which the Trainer's gradient averaging would shrink; for several GPUs use :class:`unlearn_fast.SOUL`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import transformers

from unlearn_fast.data import as_batches
from unlearn_fast.objectives import Objective, resolve_objective
from unlearn_fast.optim import Sophia
from unlearn_fast.training import answer_tokens, sampled_label_cross_entropy

Batch = Mapping[str, torch.Tensor]
SOPHIA_SETTINGS = ("lr", "betas", "rho", "weight_decay", "estimator", "hessian_interval", "eps")


class UnlearningTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose steps minimise an unlearning objective (module docstring).

    Args beyond the Trainer's:
        objective: an objective instance (e.g. ``NPO(beta=0.1)``) or name (``"gdiff"``); the trainer
            uses a fresh copy, ``trainer.objective``.
        forget_dataset: what to unlearn; retain_dataset: what to keep (needed when
            ``objective.needs_retain``; unused otherwise).
        sophia: True, a dict of Sophia settings, or False for the Trainer's optimizer.
        max_length: longest encoded question + answer, in tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        *,
        objective: Objective | str,
        forget_dataset: Any,
        retain_dataset: Any = None,
        sophia: bool | Mapping[str, Any] = True,
        max_length: int = 256,
        **trainer_kwargs: Any,
    ):
        for name, why in (
            ("train_dataset", "the steps come from forget_dataset and retain_dataset"),
            ("model_init", "the objective is prepared from one model: pass model="),
            ("compute_loss_func", "the objective is the loss"),
        ):
            if trainer_kwargs.get(name) is not None:
                raise ValueError(f"UnlearningTrainer takes no {name}: {why}")
        settings = _sophia_settings(sophia)
        super().__init__(model=model, args=args, **trainer_kwargs)
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ValueError(
                "UnlearningTrainer runs in one process on one device (the objectives normalise over "
                "torch.distributed ranks themselves); for several GPUs use unlearn_fast.SOUL under "
                "torchrun"
            )
        if settings is not None and (self.optimizer is not None or self.optimizer_cls_and_kwargs is not None):
            raise ValueError(
                "UnlearningTrainer: pass sophia=False to use the optimizer given in optimizers= or "
                "optimizer_cls_and_kwargs= (a Sophia given there still gets its bs and Hessian refresh)"
            )
        self.sophia_settings = settings
        tokenizer = self.processing_class
        self.objective = resolve_objective(objective, tokenizer=tokenizer)
        size = self.args.per_device_train_batch_size
        self.forget_batches = as_batches(
            forget_dataset, tokenizer=tokenizer, batch_size=size, max_length=max_length, what="forget_dataset"
        )
        if not self.forget_batches:
            raise ValueError("UnlearningTrainer: forget_dataset is empty; pass the examples (or batches) to unlearn")
        self.retain_batches: list[Batch] = []
        if self.objective.needs_retain:
            if retain_dataset is not None:
                self.retain_batches = as_batches(
                    retain_dataset, tokenizer=tokenizer, batch_size=size, max_length=max_length, what="retain_dataset"
                )
            if not self.retain_batches:
                raise ValueError(
                    f"UnlearningTrainer: objective {self.objective.name!r} needs retain data; pass "
                    "retain_dataset (or an objective without a retain term, e.g. gamma=0)"
                )
        self.loss_is_scaled_for_ga = False  # the objective's loss is a per-batch mean: Trainer divides it
        self._prepared = False
        self._step_batches: list[dict[str, Batch]] = []
        self._hook_handles: list[Any] = []
        self._generator: torch.Generator | None = None

    # ---- data ---------------------------------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = _PairSampler(len(self.forget_batches), len(self.retain_batches), torch.Generator().manual_seed(seed))
        # batch_size=None: each item is already a pair of collated batches.
        return torch.utils.data.DataLoader(
            _PairedBatches(self.forget_batches, self.retain_batches),
            sampler=sampler,
            batch_size=None,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batch_samples  # this optimizer step's pairs: Sophia's bs and Hessian refresh
        return batch_samples, num_items

    def floating_point_ops(self, inputs: Mapping[str, Any]) -> int:
        if "forget" in inputs:
            return sum(super(UnlearningTrainer, self).floating_point_ops(batch) for batch in inputs.values())
        return super().floating_point_ops(inputs)

    # ---- loss ---------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        if not self._prepared:
            # Before super().train(), which loads a resumed checkpoint's weights: the objective's
            # caches belong to the model before unlearning.
            self.objective.prepare(
                self.model,
                [self._prepare_input(b) for b in self.forget_batches],
                [self._prepare_input(b) for b in self.retain_batches],
            )
            self._prepared = True
        self._generator = torch.Generator().manual_seed(self.args.seed)  # CPU: the label draws are made there
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:  # the hooks reference this trainer: none stay on an optimizer used elsewhere
            for handle in self._hook_handles:
                handle.remove()
            self._hook_handles = []

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        if "forget" not in inputs:  # a plain batch (evaluation): the Trainer's own loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not self._prepared:
            raise RuntimeError(
                "UnlearningTrainer: the objective is prepared by train(); call train(), not the training step alone"
            )
        loss, logs = self.objective.loss(model, inputs["forget"], inputs.get("retain"))
        return (loss, logs) if return_outputs else loss

    # ---- optimizer ----------------------------------------------------------------------------

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.sophia_settings is not None:
            self.optimizer = self._make_sophia(self.model if model is None else model)
        optimizer = super().create_optimizer(model)
        sophia = _unwrap(optimizer)
        if isinstance(sophia, Sophia) and not self._hook_handles:
            if any(g["estimator"] == "hutchinson" for g in sophia.param_groups):
                raise ValueError(
                    "UnlearningTrainer: Sophia's 'hutchinson' estimator is not wired into the Trainer; "
                    "use 'gnb' or 'empirical', or unlearn_fast.SOUL(estimator='hutchinson')"
                )
            self._hook_handles = [
                sophia.register_step_pre_hook(self._sophia_bs),
                sophia.register_step_post_hook(self._sophia_refresh),
            ]
        return optimizer

    def _make_sophia(self, model: torch.nn.Module) -> Sophia:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "UnlearningTrainer: the model has no trainable parameters (requires_grad=False everywhere)"
            )
        settings = dict(self.sophia_settings)
        lr = settings.pop("lr", self.args.learning_rate)
        weight_decay = settings.pop("weight_decay", self.args.weight_decay)
        decay = set(self.get_decay_parameter_names(model))  # the Trainer's groups: no decay on biases, norms
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        return Sophia([g for g in groups if g["params"]], lr=lr, **settings)

    def _sophia_bs(self, optimizer: Sophia, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Step pre-hook: ``step(bs=...)``, the answer tokens of the step (all its micro-batches)."""
        if kwargs.get("bs") is not None or not self._step_batches:
            return None
        if any(g["bs"] is not None for g in optimizer.param_groups):  # a fixed bs (Sophia.soul_reference)
            return None
        return args, {**kwargs, "bs": answer_tokens(*(b for pair in self._step_batches for b in pair.values()))}

    def _sophia_refresh(self, optimizer: Sophia, args: tuple, kwargs: dict) -> None:
        """Step post-hook: Sophia-G's Hessian refresh when due, on the step's batches, after the step
        (as SOUL: the public Sophia loop's order). A step the fp16 scaler skips never gets here."""
        if not optimizer.hessian_due() or not self._step_batches:
            return
        batches = [self._prepare_input(b) for pair in self._step_batches for b in pair.values()]
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), self.compute_loss_context_manager():
            for batch in batches:  # one backward each: the graphs are not held together
                sampled_label_cross_entropy(self.model, batch, batch, self._generator, 1.0 / len(batches)).backward()
        optimizer.update_hessian()
        optimizer.zero_grad(set_to_none=True)


def _sophia_settings(sophia: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``sophia=`` as Sophia's keyword arguments (None: the Trainer's optimizer), checked now rather
    than at the first step."""
    if sophia is False or sophia is None:
        return None
    if sophia is True:
        return {}
    if not isinstance(sophia, Mapping):
        raise TypeError(f"sophia must be True, False or a dict of Sophia settings, got {type(sophia).__name__}")
    unknown = sorted(set(sophia) - set(SOPHIA_SETTINGS))
    if unknown:
        raise TypeError(
            f"sophia takes no setting {unknown}; it accepts {list(SOPHIA_SETTINGS)} (bs is the step's "
            "answer tokens, given per step)"
        )
    if sophia.get("estimator") == "hutchinson":
        raise ValueError(
            "UnlearningTrainer: Sophia's 'hutchinson' estimator is not wired into the Trainer; use 'gnb' "
            "or 'empirical', or unlearn_fast.SOUL(estimator='hutchinson')"
        )
    Sophia([torch.zeros(1)], **sophia)  # Sophia's own errors for bad values
    return dict(sophia)


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's AcceleratedOptimizer (itself an Optimizer)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class _PairedBatches(torch.utils.data.Dataset):
    """Item ``(i, r)``: forget batch i with retain batch r (None: no retain batch)."""

    def __init__(self, forget: Sequence[Batch], retain: Sequence[Batch]):
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, key: tuple[int, int | None]) -> dict[str, Batch]:
        i, r = key
        return {"forget": self.forget[i]} if r is None else {"forget": self.forget[i], "retain": self.retain[r]}


class _PairSampler(torch.utils.data.Sampler):
    """One epoch: every forget batch once, in a new random order, each with the next batch of an
    endless cycle over the retain batches (reshuffled every pass), so a retain set larger than the
    forget set is all used across epochs."""

    def __init__(self, n_forget: int, n_retain: int, generator: torch.Generator):
        self.n_forget, self.n_retain, self.generator = n_forget, n_retain, generator
        self._retain_order: list[int] = []

    def __len__(self) -> int:
        return self.n_forget

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        for i in torch.randperm(self.n_forget, generator=self.generator).tolist():
            if not self.n_retain:
                yield i, None
                continue
            if not self._retain_order:
                self._retain_order = torch.randperm(self.n_retain, generator=self.generator).tolist()
            yield i, self._retain_order.pop()
