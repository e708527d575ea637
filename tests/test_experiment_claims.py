"""The paper's claims from an eval.json: intervals over documents and verdicts, on synthetic per-document losses."""

import numpy as np

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
    found = {c.text: c for c in claims.all_claims(synthetic_results(), None, resamples=500)}
    assert found["pruning without memories degrades the model"].verdict == bootstrap.REPRODUCES
    gap = found["pruning without memories degrades the model"].interval
    assert gap.low < 0.5 < gap.high
    recovery = found["KOFF recovers most of the pruning gap (vs dense)"].interval
    assert recovery.low < 1.4 < recovery.high  # (0.5 + 0.2) / 0.5
    assert found["LoRA + KV beats LoRA alone"].verdict == bootstrap.INCONCLUSIVE  # no true difference
    assert found["each domain's own memory beats the others'"].verdict == bootstrap.REPRODUCES
    mc = found["KOFF beats pruned_retrained at multiple choice (continuation)"]
    assert mc.verdict == bootstrap.REPRODUCES and mc.interval.low < 0.5 < mc.interval.high
    assert "joint training beats prune-then-memory" not in found  # that setting was not evaluated
    assert "KOFF recovers most of the pruning gap (vs dense + memories)" not in found


def test_claims_table_and_old_eval_files():
    table = report.claims_table(claims.all_claims(synthetic_results(), None, resamples=200))
    assert "| pruning without memories degrades the model |" in table and "**reproduces**" in table
    assert claims.all_claims({"domains": DOMAINS, "loss": {}, "swap": {}}, None) == []


def test_lape_claims_read_the_effect_intervals():
    effect = bootstrap.Interval(0.2, 0.1, 0.3).as_dict()
    analysis = {"tests": {"koff": {"specific": {"effect": effect}, "general": {"effect": effect}}}}
    specific, general = claims.lape_claims(analysis)
    assert specific.verdict == bootstrap.REPRODUCES and general.verdict == bootstrap.CONTRADICTS
