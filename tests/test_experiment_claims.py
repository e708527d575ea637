"""The paper's claims from an eval.json: intervals over documents and verdicts, on synthetic per-document losses."""

import numpy as np
import pytest

from sparsemem.evaluation import bootstrap
from sparsemem.experiment import claims, report

DOMAINS = ["en-US", "de"]


def synthetic_results(seed=0, docs=30):
    """Per-token losses per setting: pruning hurts (+0.5), KOFF more than recovers it (-0.2), LoRA only equals
    KOFF exactly, the own memory is 0.3 better on the swap paragraphs, KOFF answers 80% vs 30%."""
    rng = np.random.default_rng(seed)
    domain = np.repeat([0, 1], docs)
    tokens = rng.integers(100, 300, domain.size).astype(float)
    base = rng.normal(2.5, 0.5, domain.size)
    shifts = {"dense": 0.0, "pruned": 0.5, "pruned_retrained": 0.5, "pruned_lora": -0.2, "pruned_kv": -0.2,
              "koff": -0.2}
    document_loss = {name: {"loss": ((base + shift + rng.normal(0, 0.05, domain.size)) * tokens).tolist(),
                            "first": [0.0] * domain.size} for name, shift in shifts.items()}
    document_loss["pruned_lora"] = document_loss["koff"]  # exactly no difference
    swap = [[(base + (0.0 if i == d else 0.3)) * tokens for d in domain] for i in range(2)]
    swap = [[row[j][j] for j in range(domain.size)] for row in swap]
    correct = {"koff": (rng.random(200) < 0.8).astype(int).tolist(),
               "pruned_retrained": (rng.random(200) < 0.3).astype(int).tolist()}
    return {"domains": DOMAINS, "settings": {n: n for n in shifts},
            "documents": {"domain": domain.tolist(), "tokens": tokens.tolist()},
            "loss": {n: {"mean": 0.0} for n in shifts}, "document_loss": document_loss,
            "swap": {"documents": {"domain": domain.tolist(), "tokens": tokens.tolist()}, "document_loss": swap},
            "mc_correct": {"continuation": correct}, "mc_domain": {"continuation": np.repeat([0, 1], 100).tolist()}}


def test_verdicts_follow_the_synthetic_truth():
    found = {c.text: c for c in claims.all_claims([synthetic_results()], None, resamples=500)}
    gap = found["pruning degrades the model (KOFF's mask, no memories)"]
    assert gap.verdict == bootstrap.REPRODUCES and gap.interval.low < 0.5 < gap.interval.high
    recovery = found["KOFF's memories recover most of its mask's pruning gap (vs dense)"].interval
    assert recovery.low < 1.4 < recovery.high  # (0.5 + 0.2) / 0.5, on KOFF's own mask
    assert found["LoRA + KV beats LoRA alone"].verdict == bootstrap.INCONCLUSIVE  # no true difference
    assert found["each domain's own memory beats the others'"].verdict == bootstrap.REPRODUCES
    mc = found["KOFF beats pruned_retrained at multiple choice (continuation)"]
    assert mc.verdict == bootstrap.REPRODUCES and mc.interval.low < 0.5 < mc.interval.high
    assert "joint training beats prune-then-memory (same steps)" not in found  # that setting was not evaluated
    for claim in found.values():  # one family: every claim carries its Holm-adjusted p-value
        assert claim.adjusted_p >= claim.interval.p_value
    assert found["LoRA + KV beats LoRA alone"].adjusted_verdict == bootstrap.INCONCLUSIVE
    assert gap.adjusted_verdict == bootstrap.REPRODUCES


def test_claims_read_every_seed():
    """Three seeds whose KOFF-vs-pruned gap is 0.2, 0.7 and 1.2 nats: the claim's estimate is their mean and its
    interval, resampling seeds, is much wider than one seed's over the same documents."""
    seeds = []
    for k, shift in enumerate((0.2, 0.7, 1.2)):
        results = synthetic_results()
        tokens = np.asarray(results["documents"]["tokens"])
        koff = np.asarray(results["document_loss"]["pruned"]["loss"]) - shift * tokens
        results["document_loss"]["koff"] = {"loss": koff.tolist(), "first": [0.0] * len(tokens)}
        seeds.append(results)
    name = "the memories recover part of the pruning gap (KOFF's mask)"
    every = {c.text: c for c in claims.all_claims(seeds, None, resamples=400)}[name].interval
    one = {c.text: c for c in claims.all_claims(seeds[1:2], None, resamples=400)}[name].interval
    assert abs(every.estimate - 0.7) < 1e-9 and abs(one.estimate - 0.7) < 1e-9
    assert every.low < 0.45 and every.high > 0.95  # seed-to-seed spread is in the interval
    assert one.high - one.low < 0.1
    other = synthetic_results(docs=20)
    with pytest.raises(ValueError, match="seed 1 scored other documents"):
        claims.all_claims([seeds[0], other], None, resamples=50)


def test_holm_adjustment():
    assert bootstrap.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert bootstrap.holm([]) == []
    interval = bootstrap.Interval(-0.3, -0.5, -0.1)
    assert bootstrap.adjusted_verdict(interval, 0.01, 0.0, ">") == bootstrap.CONTRADICTS
    assert bootstrap.adjusted_verdict(interval, 0.2, 0.0, ">") == bootstrap.INCONCLUSIVE


def test_non_finite_resamples_are_counted():
    strata = np.repeat([0, 1], 5)
    values = np.array([0.0, 0.0, 0.0, 0.0, 1.0] * 2)
    interval = bootstrap.bootstrap(lambda idx: 1.0 / values[idx].sum() if values[idx].sum() else np.inf, strata,
                                   resamples=300, seed=0, null=0.0)
    assert 0 < interval.dropped < 300 and interval.resamples == 300  # resamples that drew no 1.0 in either domain
    table = report.claims_table([claims.Claim("x", "1 / sum", interval, 0.0, ">")])
    assert f"x: {interval.dropped} of 300" in table


def test_claims_table_and_old_eval_files():
    table = report.claims_table(claims.all_claims([synthetic_results()], None, resamples=1000))
    assert "| pruning degrades the model (KOFF's mask, no memories) |" in table and "**reproduces**" in table
    coarse = report.claims_table(claims.all_claims([synthetic_results()], None, resamples=100))
    assert "too few resamples" in coarse  # 2/101 x 10 claims > 0.05: Holm could not decide anything
    assert claims.all_claims([{"domains": DOMAINS, "loss": {}, "swap": {}}], None, resamples=10) == []


def test_lape_claims_read_the_effect_intervals():
    effect = bootstrap.Interval(0.2, 0.1, 0.3).as_dict()
    analysis = {"tests": {"koff": {"specific": {"effect": effect}, "general": {"effect": effect}}}}
    specific, general = claims.lape_claims(analysis)
    assert specific.verdict == bootstrap.REPRODUCES and general.verdict == bootstrap.CONTRADICTS
