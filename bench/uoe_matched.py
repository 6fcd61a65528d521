"""UOE against all-parameter unlearning at matched forgetting, on the specialised MoE (issue 16, item 3).

    OMP_NUM_THREADS=2 python bench/uoe_matched.py [--steps 40] [--eval-every 4] [--seeds 0 1 2]

The model is the cached specialised MoE (``unlearn-fast build-moe``: SmolLM2-135M -> Qwen2-MoE, experts trained on
the fictitious facts, Python and prose); the forget / retain data are the facts it was built on. Runs, each for
every seed (the data order; batch 4):

* UOE with GradDiff, anchor weight alpha = 0 and 1, top-1 and top-M (``--top-m``) experts, lr ``--uoe-lr``;
* GA, GradDiff and NPO on all parameters (AdamW, lr ``--full-lr``; :class:`unlearn_fast.SOUL` with
  ``optimizer="adamw"``);
* GradDiff on the facts expert alone (expert 0 of every MoE layer, known by construction), router frozen, no anchor.

Every ``--eval-every`` steps: the forget answer probability, the in-domain retain answer probability (a fixed
sample of the retain split), the world facts' answer probability and the other domains' perplexity (held-out
Python and prose). Forgetting is matched by interpolating each trajectory linearly to the gold level: the answer
probability the model gives to facts of fictitious people it never saw (``--gold`` overrides it), what a model
retrained without the forget people would give them. A run that never reaches it is marked and reported at its
last point. The tables give mean +- standard deviation over seeds; the routing table the share of forget / retain
/ other-domain routing mass on the unlearned experts at the target layer, before and after (UOE runs).
Writes ``--out``.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from unlearn_fast import SOUL, UOE, training
from unlearn_fast.data import as_batches, collate, make_fictitious_facts, world_facts
from unlearn_fast.evaluate import answer_probability, perplexity
from unlearn_fast.methods.uoe import attribute_experts
from unlearn_fast.models import moe_layers
from unlearn_fast.objectives import GradDiff
from unlearn_fast.specialised_moe import FACTS_EXPERT, SpecialisedMoEConfig, default_domains, specialised_moe_cached

METRICS = ("forget", "retain", "world", "ppl_python", "ppl_prose")


# --- matched forgetting: pure functions on trajectories (tested on toy numbers) ---------------


def at_level(curve: Sequence[dict], level: float, key: str = "forget") -> tuple[dict, bool]:
    """Every metric of ``curve`` (points with ``step`` and metrics, in step order) linearly interpolated to where
    ``curve[key]`` first falls to ``level``, and True; or the last point and False if it never does."""
    if curve and curve[0][key] <= level:
        return dict(curve[0]), True
    for a, b in zip(curve, curve[1:]):
        if b[key] <= level < a[key]:
            t = (a[key] - level) / (a[key] - b[key])
            return {m: a[m] + t * (b[m] - a[m]) for m in a if isinstance(a[m], (int, float))}, True
    return dict(curve[-1]), False


def mean_sd(values: Sequence[float]) -> str:
    """``mean +- sd`` over seeds (sd 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def matched_table(runs: dict[str, list[dict]], level: float, start: dict) -> list[str]:
    """Markdown rows per method: the metrics at the gold forget level over seeds (each run a dict with ``curve``,
    ``trained`` and ``time_s``); ``start`` is the model before unlearning, for the relative utility columns."""
    lines = [
        f"At the gold forget level {level:.3f} (before unlearning: forget {start['forget']:.3f}, retain "
        f"{start['retain']:.3f}, world {start['world']:.3f}, perplexity python {start['ppl_python']:.2f} / prose "
        f"{start['ppl_prose']:.2f}); mean ± sd over seeds:",
        "",
        "| method | reached | step | retain | world | ppl python (Δ%) | ppl prose (Δ%) | trained params | time s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, seeds in runs.items():
        points = [at_level(run["curve"], level) for run in seeds]
        reached = sum(ok for _, ok in points)

        def col(metric: str, points=points) -> list[float]:
            return [p[metric] for p, _ in points]

        def delta(metric: str, points=points) -> str:
            return mean_sd([100 * (p[metric] / start[metric] - 1) for p, _ in points])

        lines.append(
            f"| {name} | {reached}/{len(seeds)} | {mean_sd(col('step'))} | {mean_sd(col('retain'))} | "
            f"{mean_sd(col('world'))} | {delta('ppl_python')} | {delta('ppl_prose')} | {seeds[0]['trained']:,} | "
            f"{mean_sd([run['time_s'] for run in seeds])} |"
        )
    return lines


def routing_table(rows: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """Markdown: per run, the share of each data set's routing mass on the unlearned experts, before -> after."""
    sets = list(next(iter(rows.values()))) if rows else []
    lines = ["| run | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, shares in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{b:.1%} → {a:.1%}" for b, a in shares.values()) + " |")
    return lines


# --- the runs ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--dense-until", type=int, default=4, help="evaluate every step up to this one")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--uoe-lr", type=float, default=1e-4, help="UOE's lr (the paper's, METHODS.md)")
    parser.add_argument("--full-lr", type=float, default=5e-5, help="all-parameter baselines' lr (the paper's)")
    parser.add_argument("--top-m", type=int, default=2, help="M of UOE's top-M runs")
    parser.add_argument("--retain-sample", type=int, default=16)
    parser.add_argument("--gold", type=float, default=None, help="the gold forget level (default: measured)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--only", nargs="+", default=None, help="run only the methods whose name contains one of these")
    parser.add_argument("--out", type=Path, default=Path("bench/results/uoe_matched"))
    args = parser.parse_args()

    config = SpecialisedMoEConfig()
    model, tokenizer, _, hit, entry = specialised_moe_cached("smollm2", config, cache_dir=args.cache_dir)
    if not hit:
        print(f"built the specialised MoE first: {entry}")
    domains = default_domains(config)
    retain = domains.retain[: args.retain_sample]
    texts = {d: ev for d, (_, ev) in domains.texts.items()}
    world = world_facts()

    def mean_prob(m, examples) -> float:
        return statistics.fmean(answer_probability(m, tokenizer, examples, max_length=config.max_length))

    def metrics(m: torch.nn.Module) -> dict[str, float]:
        out = {"forget": mean_prob(m, domains.forget), "retain": mean_prob(m, retain), "world": mean_prob(m, world)}
        return out | {f"ppl_{d}": perplexity(m, tokenizer, t, max_length=config.max_length) for d, t in texts.items()}

    start = metrics(model)
    gold = args.gold if args.gold is not None else mean_prob(model, unseen_people(domains, config))
    print(f"before unlearning: {start}; gold forget level {gold:.4f}", flush=True)

    runners = _runners(args, model, tokenizer, domains)
    if args.only:
        runners = {n: r for n, r in runners.items() if any(k in n for k in args.only)}
    runs: dict[str, list[dict]] = {}
    routing: dict[str, dict[str, tuple[float, float]]] = {}
    for name, run in runners.items():
        for seed in args.seeds:
            curve = [{"step": 0, **start}]

            def track(step, m, record, curve=curve, label=f"{name} seed {seed}"):
                if step <= args.dense_until or step % args.eval_every == 0:
                    curve.append({"step": step, **metrics(m)})
                    print(f"  {label} step {step}: {curve[-1]}", flush=True)
                    return curve[-1]["forget"] <= gold  # the gold level is crossed: the match needs no more

            t0 = time.perf_counter()
            unlearned, trained, target = run(seed, track)
            runs.setdefault(name, []).append({"curve": curve, "trained": trained, "time_s": time.perf_counter() - t0})
            if target is not None and seed == args.seeds[0]:
                routing[name] = routing_shares(model, unlearned, tokenizer, domains, retain, texts, target)
            del unlearned

    lines = ["# UOE at matched forgetting (bench/uoe_matched.py)", "", *matched_table(runs, gold, start), ""]
    lines += ["Routing mass on the unlearned experts at the target layer, before → after (first seed):", ""]
    lines += routing_table(routing)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    payload = {"gold": gold, "start": start, "runs": runs, "routing": routing, "args": vars(args) | {"out": None}}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))


def unseen_people(domains, config: SpecialisedMoEConfig) -> list:
    """As many facts as the forget split holds, about fictitious people the model never saw (another seed, names
    not among the trained ones)."""
    seen = {ex.person for ex in domains.forget + domains.retain}
    for seed in range(config.data_seed + 1, config.data_seed + 100):
        fresh = make_fictitious_facts(config.people * 4, config.questions_per_person, seed=seed)
        unseen = [ex for ex in fresh if ex.person not in seen]
        if len(unseen) >= len(domains.forget):
            return unseen[: len(domains.forget)]
    raise RuntimeError("could not draw unseen fictitious people")


def _runners(args, model, tokenizer, domains) -> dict[str, Callable]:
    """name -> run(seed, callback) returning (unlearned model, trained parameter count, UOE's (layer, experts))."""
    forget, retain = domains.forget, domains.retain

    def uoe(alpha: float, m: int):
        def run(seed, callback):
            result = UOE(objective="gdiff", anchor_weight=alpha, num_experts=m, lr=args.uoe_lr, steps=args.steps,
                         batch_size=4, seed=seed).unlearn(model, forget, retain, tokenizer=tokenizer, progress=False,
                                                          callback=callback)  # fmt: skip
            return result.model, result.trained_parameters, (result.target[0], result.experts)

        return run

    def full(objective: str):
        def run(seed, callback):
            copy_ = copy.deepcopy(model).requires_grad_(True)
            SOUL(objective=objective, optimizer="adamw", lr=args.full_lr, steps=args.steps, batch_size=4,
                 seed=seed).unlearn(copy_, forget, retain, tokenizer=tokenizer, inplace=True, progress=False,
                                    callback=callback)  # fmt: skip
            return copy_, sum(p.numel() for p in copy_.parameters()), None

        return run

    def expert_only(seed, callback):
        return facts_expert_graddiff(model, tokenizer, forget, retain, args.uoe_lr, args.steps, seed, callback)

    runners = {f"UOE α={a:g} top-{m}": uoe(a, m) for m in (1, args.top_m) for a in (0.0, 1.0)}
    runners |= {f"{o.upper()} (all parameters)": full(o) for o in ("ga", "gdiff", "npo")}
    runners["GradDiff (facts expert only, no anchor)"] = expert_only
    return runners


def facts_expert_graddiff(model, tokenizer, forget, retain, lr, steps, seed, callback):
    """GradDiff on expert 0 of every MoE layer (its slices of the fused weights; the routers and all else frozen):
    the other experts' gradient slices are zeroed, so AdamW (no weight decay) leaves them exactly as they were."""
    out = copy.deepcopy(model).requires_grad_(False)
    named = []
    for layer, block in moe_layers(out):
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(block.experts, name).requires_grad_(True)
            mask = torch.zeros(p.shape[0], 1, 1, dtype=p.dtype)
            mask[FACTS_EXPERT] = 1
            p.register_hook(lambda g, mask=mask: g * mask)
            named.append((f"{layer}.{name}", p))
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    batches = {n: as_batches(d, tokenizer=tokenizer, batch_size=4, max_length=96, what=n) for n, d in
               (("forget", forget), ("retain", retain))}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    streams = [training.BatchStream(batches["forget"], generator), training.BatchStream(batches["retain"], generator)]
    objective = GradDiff()
    training.train_loop(out, named, optimizer, lambda item: objective.loss(out, *item),
                        training.pair_streams(*streams), name="GradDiff (facts expert)", steps=steps,
                        max_grad_norm=1.0, callbacks=[callback], progress=False)  # fmt: skip
    per_expert = sum(p[FACTS_EXPERT].numel() for _, p in named)
    return out.eval(), per_expert, None


def routing_shares(before, after, tokenizer, domains, retain, texts, target) -> dict[str, tuple[float, float]]:
    """Share of the forget answers', retain answers' and each other domain's routing mass on ``target``'s experts
    at its layer, (before, after)."""
    layer, experts = target
    text_batches = {
        d: [collate([{"input_ids": tokenizer.encode(t)[:96], "labels": tokenizer.encode(t)[:96]} for t in ts], 0)]
        for d, ts in texts.items()
    }
    out = {}
    for name, data, tokens in [("forget", domains.forget, "answer"), ("retain", retain, "answer")] + [
        (d, b, "all") for d, b in text_batches.items()
    ]:
        pair = []
        for m in (before, after):
            scores = attribute_experts(m, data, tokenizer=tokenizer, tokens=tokens).scores[layer]
            pair.append(float(scores[list(experts)].sum() / scores.sum()))
        out[name] = tuple(pair)
    return out


if __name__ == "__main__":
    main()
