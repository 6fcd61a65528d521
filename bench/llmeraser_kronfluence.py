"""kronfluence (EK-FAC influence functions, PyPI kronfluence 1.0.1) as a peer of LLMEraser's inverse-HVP.

    OMP_NUM_THREADS=1 python bench/llmeraser_kronfluence.py [--examples 16] [--removed 3 7] [--samples 1 16]

SmolLM2-135M with a LoRA of rank 1 on the last layer's down_proj only (2,112 parameters), fine-tuned on n
fictitious facts (bench/llmeraser_inverse_hvp.py's small_lora), then cast to float64. One removal S; the
quantity compared is what both libraries compute: the influence of the removal on every training example,

    s_j = ∇L(z_j) · (H + λI)⁻¹ b,   b = (1/n) Σ_S ∇L(z),   H = (1/n) Σ_i GN(L(z_i))

(b and H as LLMEraser.remove takes them; L the token-weighted answer cross-entropy). Rows: exact (our CG on
the full Gauss-Newton operator to 1e-8), ours fisher (Woodbury on sampled-label rows), ours ekfac, and
kronfluence's ekfac (its pairwise scores, query = the removed examples, train = all n), the fitted ones for each
number k of label draws per example in ``--samples``. Columns: the time to fit the curvature, the time of one
request (to ΔΘ; to the n scores) and ‖s − s_exact‖/‖s_exact‖. Every row runs in this process on the same model
under the same prefix cache (the 29 frozen layers below the LoRA run once per example; every pass is then the
last layer and the head, for all rows alike). Writes bench/results/llmeraser_kronfluence.{json,md}.

Matching kronfluence to LLMEraser (tests/test_kronfluence_peer.py checks it on a tiny LoRA):

* Loss. kronfluence's per-example loss here is the summed answer-token cross-entropy Σ_t CE_t (its convention:
  the example's negative log-likelihood); LLMEraser's is L(z) = Σ_t CE_t / T̄ (T̄: the mean answer length), so
  kronfluence's gradients are T̄·∇L and its curvature, the mean over examples of sampled-label gradient outer
  products, is (1/n) Σ_z GN(Σ_t CE_t) = T̄·H (the per-token weight enters a Fisher squared, a GN once).
* Damping. kronfluence's ``damping_factor`` is absolute (added to its corrected eigenvalues; only None means
  0.1 x their mean), so λ_kronfluence = T̄·λ gives T̄(H + λI); then s_j = Σ_{q∈S} score[q, j] / (n·T̄).
* Modules: the LoRA ``lora_A`` / ``lora_B`` Linear modules, each its own Kronecker block, in both.
* Labels. kronfluence fits the true Fisher on labels the task draws (``sample=True``); this task draws them with
  the generator LLMEraser uses for example i (``unlearn_fast.curvature.example_generator``), from the same
  probabilities (kronfluence's passes use LLMEraser's eager attention), so both EK-FACs see the same draws.
  k draws per example: each example k times in kronfluence's fit set, copy s taking draw s.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from unlearn_fast.curvature import example_generator
from unlearn_fast.data import IGNORE_INDEX, collate, encode_qa, pad_token_id_of
from unlearn_fast.models import hvp_safe, logit_scale

# ---------------------------------------------------------------------------------------------
# The kronfluence side (tests/test_kronfluence_peer.py uses it too).


def kronfluence_task(modules: Sequence[str], seed: int = 0):
    """A kronfluence ``Task``: the summed answer-token cross-entropy of each example (train loss and
    measurement), on ``modules`` (names of the LoRA Linear modules). Its sampled labels (``sample=True``) are
    LLMEraser's: draw ``batch["sample"]`` of the ``task.samples`` that ``curvature_samples=task.samples,
    seed=seed`` draws for example ``batch["index"]``."""
    from kronfluence.task import Task

    class AnswerTokenCE(Task):
        samples = 1

        def _logits(self, batch, model):
            decoder, head = model.get_decoder(), model.get_output_embeddings()
            hidden = decoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state[:, :-1]
            targets = batch["labels"][:, 1:]
            scored = targets != IGNORE_INDEX
            logits = head(hidden[scored].to(head.weight.dtype)) * logit_scale(model.config)
            return logits, targets[scored], scored.sum(1).tolist()

        def compute_train_loss(self, batch, model, sample=False):
            logits, targets, lengths = self._logits(batch, model)
            if sample:  # y ~ p at every answer token, LLMEraser's draws of each example
                parts = []
                draws = zip(logits.detach().split(lengths), batch["index"].tolist(), batch["sample"].tolist())
                for part, index, draw in draws:
                    p = torch.softmax(part.double(), dim=-1).cpu()
                    generator = example_generator(seed, index, 0)
                    parts.append(torch.multinomial(p, self.samples, replacement=True, generator=generator).T[draw])
                targets = torch.cat(parts).to(logits.device)
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            return F.cross_entropy(logits.to(acc), targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return AnswerTokenCE()


@contextmanager
def like_llmeraser(model):
    """kronfluence's passes with the attention kernel of LLMEraser's (eager, :func:`hvp_safe`; SDPA's logits differ
    by ~1e-7 relative, enough to flip a sampled label now and then in a 49k-token vocabulary), and without the
    FutureWarning kronfluence 1.0.1 raises per call (it builds a torch.cuda.amp.GradScaler, even on CPU)."""
    with warnings.catch_warnings(), hvp_safe(model):
        warnings.filterwarnings("ignore", message=".*GradScaler", category=FutureWarning)
        yield


class KronfluencePeer:
    """kronfluence's EK-FAC on a copy of ``model`` (kronfluence wraps its modules), float64 throughout.

    ``fit(k)`` fits the factors over ``examples`` with k label draws per example (the draws of LLMEraser's
    ``curvature_samples=k, seed=seed``); ``scores(removed)`` then gives s_j (module docstring) for every
    example j, from kronfluence's pairwise scores with query = the removed examples."""

    def __init__(self, model, tokenizer, examples, damping: float, *, seed: int = 0, workdir: str | Path):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.utils.dataset import DataLoaderKwargs

        names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        self.modules = [n[: -len(".weight")] for n in names]
        # As LLMEraser encodes them (max_length 256), with each example's index for its label draws.
        self.data = [dict(encode_qa(tokenizer, ex, 256), index=i, sample=0) for i, ex in enumerate(examples)]
        answers = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in self.data]
        self.mean_answer_tokens = sum(answers) / len(answers)  # T̄, as LLMEraser's loss_weighting="token"
        self.damping = damping
        pad = pad_token_id_of(tokenizer)

        def collate_fn(items):
            return {**collate(items, pad), **{k: torch.tensor([e[k] for e in items]) for k in ("index", "sample")}}

        logging.getLogger("kronfluence").setLevel(logging.WARNING)
        self.task = kronfluence_task(self.modules, seed)
        self.model = prepare_model(copy.deepcopy(model), self.task)
        self.analyzer = Analyzer(
            "llmeraser_peer", self.model, self.task, cpu=True, disable_tqdm=True, output_dir=workdir
        )
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_fn))
        self._factors, self._requests = None, 0

    def fit(self, samples: int = 1) -> None:
        from kronfluence.arguments import FactorArguments

        f64 = torch.float64
        args = FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=False,
            covariance_max_examples=None,
            lambda_max_examples=None,
            activation_covariance_dtype=f64,
            gradient_covariance_dtype=f64,
            per_sample_gradient_dtype=f64,
            lambda_dtype=f64,
            eigendecomposition_dtype=f64,
        )
        self.task.samples = samples
        self._factors = f"ekfac_k{samples}"
        fit_set = [dict(e, sample=s) for e in self.data for s in range(samples)]
        with like_llmeraser(self.model):
            self.analyzer.fit_all_factors(
                self._factors, fit_set, per_device_batch_size=1, factor_args=args, overwrite_output_dir=True
            )

    def pairwise(self, removed: Sequence[int], damping_factor: float) -> torch.Tensor:
        """kronfluence's pairwise scores [|removed|, n] with its own ``damping_factor``."""
        from kronfluence.arguments import ScoreArguments

        f64 = torch.float64
        args = ScoreArguments(
            damping_factor=damping_factor,
            per_sample_gradient_dtype=f64,
            precondition_dtype=f64,
            score_dtype=f64,
            query_gradient_svd_dtype=f64,
        )
        self._requests += 1
        name = f"request{self._requests}"
        with like_llmeraser(self.model):
            self.analyzer.compute_pairwise_scores(
                name,
                self._factors,
                query_dataset=[self.data[i] for i in removed],
                train_dataset=self.data,
                per_device_query_batch_size=1,
                per_device_train_batch_size=1,
                score_args=args,
                overwrite_output_dir=True,
            )
        return self.analyzer.load_pairwise_scores(name)["all_modules"].double()

    def scores(self, removed: Sequence[int], damping: float | None = None) -> torch.Tensor:
        """s_j = ∇L(z_j)·(H + λI)⁻¹ b for every j (λ: ``damping``, default the peer's): kronfluence's
        scores of the summed loss at its absolute damping_factor T̄λ, summed over the queries, over n·T̄."""
        t, damping = self.mean_answer_tokens, self.damping if damping is None else damping
        return self.pairwise(removed, t * damping).sum(0) / (len(self.data) * t)


# ---------------------------------------------------------------------------------------------
# The benchmark.


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def step_of(eraser, removed: Sequence[int]) -> tuple[torch.Tensor, object]:
    """ΔΘ of ``eraser.remove(removed)`` (flat) and its report."""
    before = torch.cat([eraser.model.get_parameter(p).detach().reshape(-1) for p in eraser.parameter_names])
    result = eraser.remove(removed, progress=False)
    after = torch.cat([result.model.get_parameter(p).detach().reshape(-1) for p in eraser.parameter_names])
    return after - before, result.report


def run(args, model, tokenizer, facts, workdir) -> dict:
    from unlearn_fast.methods.llmeraser import LLMEraser
    from unlearn_fast.models import prefix_cached

    removed = list(args.removed)
    settings = dict(tokenizer=tokenizer, damping=args.damping, examples_per_pass=1, check_fit=False, seed=args.seed)
    settings["hvp_method"] = "double_backward"  # forward-mode tangents cannot key the prefix cache
    peer = KronfluencePeer(model, tokenizer, facts, args.damping, seed=args.seed, workdir=workdir)
    batches = [collate([e], pad_token_id_of(tokenizer)) for e in peer.data]  # every pass is one example
    layer = int(args.module.split(".")[1])
    rows = {}
    with prefix_cached(model, layer, batches) as cache, prefix_cached(peer.model, layer, batches, states=cache.states):
        exact = LLMEraser(model, facts, solver="cg", tol=args.tol, **settings)
        # The n training gradients: ours turn ΔΘ into the n scores with them (kronfluence inside its request).
        G, grads_s = timed(
            lambda: torch.stack([exact._gradient([exact._term(e, 1.0, f"{j}")]) for j, e in enumerate(exact._encoded)])
        )
        x, report = step_of(exact, removed)
        gold = G @ x
        request = report.gradient_time_s + report.solve_time_s  # as remove() times them: not its model copy
        rows["exact (CG)"] = dict(
            fit_s=None, delta_s=request, scores_s=request + grads_s, error=0.0,
            cg_iterations=report.iterations, hvps=report.hvps, residual=report.residual,
        )  # fmt: skip
        print(f"exact: {report.iterations} CG iterations, residual {report.residual:.2g}, {request:.1f} s", flush=True)
        scores = {"exact": gold}
        for k in args.samples:
            for method in ("fisher", "ekfac"):
                eraser = LLMEraser(model, facts, curvature_method=method, curvature_samples=k, **settings)
                _, fit_s = timed(eraser.fit_curvature)
                x, report = step_of(eraser, removed)
                scores[f"ours {method}, k={k}"] = s = G @ x
                request = report.gradient_time_s + report.solve_time_s
                rows[f"ours {method}, k={k}"] = dict(
                    fit_s=fit_s, delta_s=request, scores_s=request + grads_s, error=rel(s, gold)
                )
            _, fit_s = timed(lambda k=k: peer.fit(k))
            s, request = timed(lambda: peer.scores(removed))
            scores[f"kronfluence ekfac, k={k}"] = s
            rows[f"kronfluence ekfac, k={k}"] = dict(
                fit_s=fit_s, delta_s=None, scores_s=request, error=rel(s, gold),
                vs_ours_ekfac=rel(s, scores[f"ours ekfac, k={k}"]),
            )  # fmt: skip
            for name in (f"ours fisher, k={k}", f"ours ekfac, k={k}", f"kronfluence ekfac, k={k}"):
                print(f"{name}: {rows[name]}", flush=True)
    return dict(
        rows=rows,
        dim=exact.dim,
        n=exact.n,
        mean_answer_tokens=peer.mean_answer_tokens,
        gradients_s=grads_s,
        scores={name: s.tolist() for name, s in scores.items()},
    )


def main() -> None:
    from llmeraser_inverse_hvp import small_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16, help="fictitious facts fine-tuned on (n)")
    parser.add_argument("--removed", type=int, nargs="+", default=[3, 7], help="the removal S (indices)")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--module", default="layers.29.mlp.down_proj")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--damping", type=float, default=0.1, help="λ of (H + λI) (H's largest eigenvalue is ~21 on the default LoRA)"
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 16], help="label draws per example, k")
    parser.add_argument("--seed", type=int, default=0, help="the label draws")
    parser.add_argument("--tol", type=float, default=1e-8, help="the exact row's CG tolerance")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llmeraser_kronfluence"))
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer, facts, ft = small_lora(args.examples, args.rank, args.module, args.epochs)
    model = model.double()  # the exact row is a CG to 1e-8: float64 products (RMSNorm still rounds in float32)
    print(f"LoRA r={args.rank} on {args.module}, n={len(facts)}, answer prob {ft.final_answer_prob:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        payload = run(args, model, tokenizer, facts, workdir)
    payload.update(
        settings={**vars(args), "out": str(args.out)},
        final_answer_prob=ft.final_answer_prob,
        wall_s=time.perf_counter() - start,
        threads=torch.get_num_threads(),
    )
    write(args, payload)


def write(args, payload) -> None:
    rows = payload["rows"]
    exact = rows["exact (CG)"]
    lines = [
        f"kronfluence 1.0.1's EK-FAC and LLMEraser on SmolLM2-135M (float64), LoRA r={args.rank} on {args.module} "
        f"({payload['dim']} parameters), n={payload['n']} facts, removal of {args.removed}, λ={args.damping:g}; "
        f"k label draws per example, the same draws in ours and kronfluence's; {payload['threads']} thread(s). "
        "Error: ‖s − s_exact‖/‖s_exact‖ of the n scores s_j = ∇L(z_j)·(H + λI)⁻¹ b.",
        "",
        "| row | fit (s) | request: ΔΘ (s) | request: n scores (s) | error vs exact |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        fit = "—" if row["fit_s"] is None else f"{row['fit_s']:.2f}"
        delta = "—" if row["delta_s"] is None else f"{row['delta_s']:.2f}"
        error = "reference" if name.startswith("exact") else f"{row['error']:.3g}"
        lines.append(f"| {name} | {fit} | {delta} | {row['scores_s']:.2f} | {error} |")
    agreement = ", ".join(
        f"{row['vs_ours_ekfac']:.2g} (k={name.split('k=')[1]})" for name, row in rows.items() if "vs_ours_ekfac" in row
    )
    lines += [
        "",
        f"Exact: CG to relative residual {exact['residual']:.2g} in {exact['cg_iterations']} iterations "
        f"({exact['hvps']} single-example curvature products). Ours: ΔΘ = LLMEraser.remove (b and the solve, as "
        "its report times them, not the copy of the model it returns); its n scores add the n training gradients "
        f"({payload['gradients_s']:.2f} s, the same for every row of ours). kronfluence: compute_pairwise_scores "
        "(query gradients, preconditioning, n training gradients); it gives scores, not a step. kronfluence's "
        f"scores against our EK-FAC's, relative difference: {agreement} (one approximation, the same draws). "
        f"Whole run {payload['wall_s']:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
