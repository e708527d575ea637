"""The paper's claims as statistics of one run's eval.json, each with a paired 95% interval and a verdict.

Losses are the mean over domains of each domain's loss per token (nats) on the held-out
documents; a difference `A - B > 0` means B is better. Intervals are paired bootstraps
over documents (questions for multiple choice, paragraphs for the memory swap),
stratified by domain (`sparsemem.evaluation.bootstrap`). A claim whose settings the run
did not evaluate is left out. Recovery is the fraction of the pruning gap KOFF closes,
measured against dense and against dense + memories (memories trained on the unpruned
model: what memories can do without pruning).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsemem.evaluation import bootstrap


@dataclasses.dataclass(frozen=True)
class Claim:
    text: str  # the paper's claim, as tested here
    statistic: str  # what the interval is of
    interval: bootstrap.Interval
    null: float
    direction: str  # the claim is "statistic <direction> null"

    @property
    def verdict(self) -> str:
        return self.interval.verdict(self.null, self.direction)

    def as_dict(self) -> dict:
        return {"claim": self.text, "statistic": self.statistic, "interval": self.interval.as_dict(),
                "null": self.null, "direction": self.direction, "verdict": self.verdict}


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


def loss_claims(results: dict, *, resamples: int = 2000, seed: int = 0) -> list[Claim]:
    """Perplexity claims: pruning gap, recovery, LoRA + KV vs each alone, joint vs sequential, mask baselines."""
    if "document_loss" not in results:
        return []
    loss, strata = loss_statistics(results)
    label = results["settings"]
    base = pruned_baseline(results)
    out = []

    def add(text, statistic, fn, null=0.0, direction=">", needs=()):
        if all(n in loss for n in needs):
            out.append(Claim(text, statistic, bootstrap.bootstrap(fn, strata, resamples=resamples, seed=seed),
                             null, direction))

    def diff(a, b):  # looked up when resampled: `add` skips claims whose settings are missing
        return lambda idx: loss[a](idx) - loss[b](idx)

    def recovery(reference):
        return lambda idx: (loss[base](idx) - loss["koff"](idx)) / (loss[base](idx) - loss[reference](idx))

    add("pruning without memories degrades the model", f"loss({label.get(base)}) - loss(dense)",
        diff(base, "dense"), needs=(base, "dense"))
    add("KOFF recovers most of the pruning gap (vs dense)",
        "(loss(pruned) - loss(KOFF)) / (loss(pruned) - loss(dense))", recovery("dense"), 0.5,
        needs=(base, "dense", "koff"))
    if "dense_memory" in results.get("settings", {}) and "trained unpruned" in label.get("dense_memory", ""):
        add("KOFF recovers most of the pruning gap (vs dense + memories)",
            "(loss(pruned) - loss(KOFF)) / (loss(pruned) - loss(dense + memories))", recovery("dense_memory"), 0.5,
            needs=(base, "dense_memory", "koff"))
    add("LoRA + KV beats LoRA alone", "loss(LoRA only) - loss(KOFF)", diff("pruned_lora", "koff"),
        needs=("pruned_lora", "koff"))
    add("LoRA + KV beats KV memory alone", "loss(KV only) - loss(KOFF)", diff("pruned_kv", "koff"),
        needs=("pruned_kv", "koff"))
    add("joint training beats prune-then-memory", "loss(prune then memory) - loss(KOFF)",
        diff("prune_then_memory", "koff"), needs=("prune_then_memory", "koff"))
    for mask, name in (("random_mask", "a random mask"), ("score_mask", "a Taylor-score mask")):
        add(f"KOFF's mask beats {name} (no memories)", f"loss({label.get(mask)}) - loss(KOFF mask, no memories)",
            diff(mask, "pruned"), needs=(mask, "pruned"))
        add(f"KOFF beats {name} with memories", f"loss({label.get(mask + '_memory')}) - loss(KOFF)",
            diff(mask + "_memory", "koff"), needs=(mask + "_memory", "koff"))
    return out


def swap_claim(results: dict, *, resamples: int = 2000, seed: int = 0) -> list[Claim]:
    """Each domain's own memory beats the other domains' memories on its text."""
    swap = results.get("swap", {})
    if "document_loss" not in swap:
        return []
    domain = np.asarray(swap["documents"]["domain"])
    tokens = np.asarray(swap["documents"]["tokens"], float)
    losses = np.asarray(swap["document_loss"])  # [memory i, paragraph]
    D = losses.shape[0]
    if D < 2:
        return []

    def advantage(idx):
        per = np.array([np.bincount(domain[idx], losses[i, idx], D) / np.bincount(domain[idx], tokens[idx], D)
                        for i in range(D)])  # [memory, text domain]
        own = np.diag(per)
        others = (per.sum(0) - own) / (D - 1)
        return float(np.mean(others - own))

    return [Claim("each domain's own memory beats the others'", "mean loss(other memories) - loss(own memory)",
                  bootstrap.bootstrap(advantage, domain, resamples=resamples, seed=seed), 0.0, ">")]


def mean_accuracy(correct: np.ndarray, domain: np.ndarray, num_domains: int):
    """Statistic: mean over the domains that have questions of each domain's accuracy, on the questions indexed."""

    def statistic(idx: np.ndarray) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):  # a domain without questions is NaN and left out
            return float(np.nanmean(np.bincount(domain[idx], correct[idx], num_domains)
                                    / np.bincount(domain[idx], minlength=num_domains)))

    return statistic


def mc_claims(results: dict, *, resamples: int = 2000, seed: int = 0) -> list[Claim]:
    """KOFF answers more multiple-choice questions than pruning without memories (per task)."""
    out = []
    base = pruned_baseline(results)
    for task, correct in results.get("mc_correct", {}).items():
        strata = np.asarray(results["mc_domain"][task])
        other = base if base in correct else "pruned" if "pruned" in correct else None
        if "koff" not in correct or other is None or len(strata) == 0:
            continue
        D = len(results["domains"])
        acc_koff = mean_accuracy(np.asarray(correct["koff"], float), strata, D)
        acc_ref = mean_accuracy(np.asarray(correct[other], float), strata, D)
        out.append(Claim(f"KOFF beats {results['settings'][other]} at multiple choice ({task})",
                         f"accuracy(KOFF) - accuracy({results['settings'][other]})",
                         bootstrap.bootstrap(bootstrap.difference(acc_koff, acc_ref), strata, resamples=resamples,
                                             seed=seed), 0.0, ">"))
    return out


def lape_claims(analysis: dict | None, variant: str = "koff") -> list[Claim]:
    """Language-specific neurons are preferentially removed; language-general ones preferentially kept."""
    tests = (analysis or {}).get("tests", {}).get(variant, {})
    out = []
    for name, text, direction in (("specific", "language-specific neurons are preferentially removed", ">"),
                                  ("general", "language-general neurons are preferentially kept", "<")):
        if name in tests:
            out.append(Claim(text, f"removed fraction of {name} neurons - chance",
                             bootstrap.Interval(**tests[name]["effect"]), 0.0, direction))
    return out


def all_claims(results: dict, analysis: dict | None, *, resamples: int = 2000) -> list[Claim]:
    return (loss_claims(results, resamples=resamples) + swap_claim(results, resamples=resamples)
            + mc_claims(results, resamples=resamples) + lape_claims(analysis))
