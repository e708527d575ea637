"""The paper's claims as statistics of a run's eval.json files, each with a paired 95% interval and verdicts.

Losses are the mean over domains of each domain's loss per token (nats) on the held-out
documents; a difference `A - B > 0` means B is better. Intervals are paired bootstraps
over documents (questions for multiple choice, paragraphs for the memory swap),
stratified by domain, and over training seeds when the run has several: every claim reads
every seed's eval.json (`sparsemem.evaluation.bootstrap`). A claim whose settings the run
did not evaluate is left out. The claims of a report are one family: each shows its own
verdict (its interval) and a Holm-adjusted one (family-wise error 5%).

The pruning gap and what the memories recover are read on one mask at a time: "KOFF mask,
no memories" minus dense is what KOFF's mask costs, "KOFF mask, no memories" minus KOFF is
what the memories give back on that same mask; their ratio is the recovery. Whether a
learned mask beats a one-shot score mask is asked of masks trained without memories in the
same budget ("pruned, trained without memories" vs the Taylor-score mask), and separately of
both with memories.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sparsemem.evaluation import bootstrap


@dataclasses.dataclass(frozen=True)
class Claim:
    text: str  # the paper's claim, as tested here
    statistic: str  # what the interval is of
    interval: bootstrap.Interval
    null: float
    direction: str  # the claim is "statistic <direction> null"
    adjusted_p: float | None = None  # Holm-adjusted over the report's family (`adjust`)

    @property
    def verdict(self) -> str:
        return self.interval.verdict(self.null, self.direction)

    @property
    def adjusted_verdict(self) -> str | None:
        if self.adjusted_p is None:
            return None
        return bootstrap.adjusted_verdict(self.interval, self.adjusted_p, self.null, self.direction)

    def as_dict(self) -> dict:
        return {"claim": self.text, "statistic": self.statistic, "interval": self.interval.as_dict(),
                "null": self.null, "direction": self.direction, "verdict": self.verdict,
                "adjusted_p": self.adjusted_p, "adjusted_verdict": self.adjusted_verdict}


def adjust(claims: Sequence[Claim]) -> list[Claim]:
    """`claims` with Holm-adjusted p-values over the whole family (claims without a p-value stay unadjusted)."""
    tested = [i for i, c in enumerate(claims) if c.interval.p_value is not None]
    adjusted = dict(zip(tested, bootstrap.holm([claims[i].interval.p_value for i in tested])))
    return [dataclasses.replace(c, adjusted_p=adjusted.get(i)) for i, c in enumerate(claims)]


def same_documents(per_seed: Sequence[dict], key: str = "documents") -> None:
    """Refuse seeds that scored different documents: a paired bootstrap over them would pair strangers."""
    first = per_seed[0].get(key)
    for k, results in enumerate(per_seed[1:], 1):
        if results.get(key) != first:
            raise ValueError(f"seed {k} scored other {key} than seed 0; claims over seeds need the same held-out "
                             "documents in every seed's eval.json (same eval.split, eval.documents and corpus)")


def pruned_baseline(results: dict) -> str:
    """The pruning-without-memories setting claims compare against: retrained if the run trained it."""
    return "pruned_retrained" if "pruned_retrained" in results["loss"] else "pruned"


def loss_statistics(results: dict) -> tuple[dict, np.ndarray]:
    """`({setting: statistic}, strata)`: each setting's domain-mean loss on resampled documents (see
    `bootstrap.domain_mean_loss`), and the documents' domains to stratify the resampling by."""
    docs = results["documents"]
    domain, tokens = np.asarray(docs["domain"]), np.asarray(docs["tokens"], float)
    D = len(results["domains"])
    return {name: bootstrap.domain_mean_loss(np.asarray(v["loss"]), tokens, domain, D)
            for name, v in results["document_loss"].items()}, domain


def loss_claims(per_seed: Sequence[dict], *, resamples: int, seed: int = 0) -> list[Claim]:
    """Perplexity claims: pruning gap, recovery on one mask, LoRA + KV vs each alone, joint vs sequential, masks."""
    if "document_loss" not in per_seed[0]:
        return []
    same_documents(per_seed)
    statistics = [loss_statistics(results) for results in per_seed]
    loss, strata = [s[0] for s in statistics], statistics[0][1]
    label = per_seed[0]["settings"]
    out = []

    def add(text, statistic, fn, null=0.0, direction=">", needs=()):
        if all(n in loss[0] for n in needs):
            per_seed_fn = [lambda idx, k=k: fn(loss[k], idx) for k in range(len(loss))]
            out.append(Claim(text, statistic, bootstrap.bootstrap(per_seed_fn, strata, resamples=resamples, seed=seed,
                                                                  null=null), null, direction))

    def diff(a, b):
        return lambda l, idx: l[a](idx) - l[b](idx)

    def recovery(mask_alone, with_memory, reference):
        return lambda l, idx: ((l[mask_alone](idx) - l[with_memory](idx))
                               / (l[mask_alone](idx) - l[reference](idx)))

    add("pruning degrades the model (KOFF's mask, no memories)", "loss(KOFF mask, no memories) - loss(dense)",
        diff("pruned", "dense"), needs=("pruned", "dense"))
    add("pruning degrades the model (mask trained without memories)",
        f"loss({label.get('pruned_retrained')}) - loss(dense)", diff("pruned_retrained", "dense"),
        needs=("pruned_retrained", "dense"))
    add("the memories recover part of the pruning gap (KOFF's mask)",
        "loss(KOFF mask, no memories) - loss(KOFF)", diff("pruned", "koff"), needs=("pruned", "koff"))
    add("KOFF's memories recover most of its mask's pruning gap (vs dense)",
        "(loss(KOFF mask, no memories) - loss(KOFF)) / (loss(KOFF mask, no memories) - loss(dense))",
        recovery("pruned", "koff", "dense"), 0.5, needs=("pruned", "dense", "koff"))
    add("the memories recover part of the pruning gap (Taylor-score mask)",
        f"loss({label.get('score_mask')}) - loss({label.get('score_mask_memory')})",
        diff("score_mask", "score_mask_memory"), needs=("score_mask", "score_mask_memory"))
    add("LoRA + KV beats LoRA alone", "loss(LoRA only) - loss(KOFF)", diff("pruned_lora", "koff"),
        needs=("pruned_lora", "koff"))
    add("LoRA + KV beats KV memory alone", "loss(KV only) - loss(KOFF)", diff("pruned_kv", "koff"),
        needs=("pruned_kv", "koff"))
    add("joint training beats prune-then-memory (same steps)", "loss(prune then memory) - loss(KOFF)",
        diff("prune_then_memory", "koff"), needs=("prune_then_memory", "koff"))
    add("KOFF from this run's gate start beats KOFF from the uniform start", f"loss({label.get('koff_uniform')}) - "
        "loss(KOFF)", diff("koff_uniform", "koff"), needs=("koff_uniform", "koff"))
    for start in ("uniform", "importance"):
        name = f"koff_{start}"
        add(f"KOFF ({start} gate start) beats the Taylor-score mask + memories",
            f"loss({label.get('score_mask_memory')}) - loss({label.get(name)})", diff("score_mask_memory", name),
            needs=("score_mask_memory", name))
    add("a mask learned without memories beats the Taylor-score mask (same steps, no memories)",
        f"loss({label.get('score_mask')}) - loss({label.get('pruned_retrained')})",
        diff("score_mask", "pruned_retrained"), needs=("score_mask", "pruned_retrained"))
    add("KOFF's mask beats a random mask (no memories)", f"loss({label.get('random_mask')}) - loss(KOFF mask, no "
        "memories)", diff("random_mask", "pruned"), needs=("random_mask", "pruned"))
    for mask, name in (("random_mask", "a random mask"), ("score_mask", "the Taylor-score mask")):
        add(f"KOFF beats {name} with memories", f"loss({label.get(mask + '_memory')}) - loss(KOFF)",
            diff(mask + "_memory", "koff"), needs=(mask + "_memory", "koff"))
    return out


def swap_claim(per_seed: Sequence[dict], *, resamples: int, seed: int = 0) -> list[Claim]:
    """Each domain's own memory beats the other domains' memories on its text."""
    swaps = [results.get("swap", {}) for results in per_seed]
    if "document_loss" not in swaps[0]:
        return []
    same_documents(swaps)
    domain = np.asarray(swaps[0]["documents"]["domain"])
    tokens = np.asarray(swaps[0]["documents"]["tokens"], float)
    D = len(swaps[0]["document_loss"])
    if D < 2:
        return []

    def advantage(losses):  # losses [memory i, paragraph]
        def statistic(idx):
            per = np.array([np.bincount(domain[idx], losses[i, idx], D) / np.bincount(domain[idx], tokens[idx], D)
                            for i in range(D)])  # [memory, text domain]
            own = np.diag(per)
            others = (per.sum(0) - own) / (D - 1)
            return float(np.mean(others - own))
        return statistic

    per_seed_fn = [advantage(np.asarray(swap["document_loss"])) for swap in swaps]
    return [Claim("each domain's own memory beats the others'", "mean loss(other memories) - loss(own memory)",
                  bootstrap.bootstrap(per_seed_fn, domain, resamples=resamples, seed=seed, null=0.0), 0.0, ">")]


def mean_accuracy(correct: np.ndarray, domain: np.ndarray, num_domains: int):
    """Statistic: mean over the domains that have questions of each domain's accuracy, on the questions indexed."""

    def statistic(idx: np.ndarray) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):  # a domain without questions is NaN and left out
            return float(np.nanmean(np.bincount(domain[idx], correct[idx], num_domains)
                                    / np.bincount(domain[idx], minlength=num_domains)))

    return statistic


def mc_claims(per_seed: Sequence[dict], *, resamples: int, seed: int = 0) -> list[Claim]:
    """KOFF answers more multiple-choice questions than pruning without memories (per task)."""
    out = []
    results = per_seed[0]
    base = pruned_baseline(results)
    same_documents(per_seed, "mc_domain")
    for task, correct in results.get("mc_correct", {}).items():
        strata = np.asarray(results["mc_domain"][task])
        other = base if base in correct else "pruned" if "pruned" in correct else None
        if "koff" not in correct or other is None or len(strata) == 0:
            continue
        D = len(results["domains"])
        per_seed_fn = [bootstrap.difference(mean_accuracy(np.asarray(r["mc_correct"][task]["koff"], float), strata, D),
                                            mean_accuracy(np.asarray(r["mc_correct"][task][other], float), strata, D))
                       for r in per_seed]
        out.append(Claim(f"KOFF beats {results['settings'][other]} at multiple choice ({task})",
                         f"accuracy(KOFF) - accuracy({results['settings'][other]})",
                         bootstrap.bootstrap(per_seed_fn, strata, resamples=resamples, seed=seed, null=0.0), 0.0, ">"))
    return out


def lape_claims(analysis: dict | None, variant: str = "koff") -> list[Claim]:
    """Language-specific neurons are preferentially removed; language-general ones preferentially kept.

    The intervals and one-sided permutation p-values come from `analysis/lape.py`; the family
    adjustment takes twice the smaller one.
    """
    tests = (analysis or {}).get("tests", {}).get(variant, {})
    out = []
    for name, text, direction in (("specific", "language-specific neurons are preferentially removed", ">"),
                                  ("general", "language-general neurons are preferentially kept", "<")):
        if name in tests:
            test = tests[name]
            p = min(1.0, 2 * min(test["p_removed"], test["p_kept"])) if "p_removed" in test else None
            interval = dataclasses.replace(bootstrap.Interval(**test["effect"]), p_value=p)
            out.append(Claim(text, f"removed fraction of {name} neurons - chance", interval, 0.0, direction))
    return out


def all_claims(per_seed: Sequence[dict], analysis: dict | None, *, resamples: int) -> list[Claim]:
    """Every claim the run's eval.json files (seed 0 first) and analysis support, Holm-adjusted as one family."""
    if not per_seed:
        return []
    return adjust(loss_claims(per_seed, resamples=resamples) + swap_claim(per_seed, resamples=resamples)
                  + mc_claims(per_seed, resamples=resamples) + lape_claims(analysis))
