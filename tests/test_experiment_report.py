"""Report tables from eval.json, including files written before translation questions existed."""

import numpy as np

from sparsemem.experiment import report

RESULTS = {"domains": ["en-US", "de"], "settings": {"dense": "dense", "koff": "KOFF"}}
ACCURACY = {"dense": {"en-US": 0.5, "de": 0.25, "mean": 0.375}, "koff": {"en-US": 1.0, "de": 0.75, "mean": 0.875}}


def test_multiple_choice_sections_per_task_with_na_for_missing_domains():
    translation = {"dense": {"en-US": float("nan"), "de": 1.0, "mean": 1.0}}
    results = {**RESULTS, "mc": {"continuation": ACCURACY, "translation": translation},
               "mc_questions_per_domain": {"continuation": 8, "translation": 6}}
    text = "\n".join(report.mc_sections(results, 200))
    assert "## Multiple choice: continuation" in text and "8 questions per domain" in text
    assert "## Multiple choice: translation (true translation of a en-US paragraph" in text
    assert "| dense | n/a | 1.000 | 1.000 |" in text


def test_eval_files_from_before_translation_questions_still_render():
    old = {**RESULTS, "mc": ACCURACY, "mc_questions_per_domain": 8}
    assert report.mc_sections(old, 200) == report.mc_sections(
        {**RESULTS, "mc": {"continuation": ACCURACY}, "mc_questions_per_domain": {"continuation": 8}}, 200)
    assert "| KOFF | 1.000 | 0.750 | 0.875 |" in "\n".join(report.mc_sections(old, 200))


def _scored(loss: list[float]) -> dict:
    """eval.json fields of a run that scored four documents (two per domain) with KOFF."""
    documents = {"domain": [0, 0, 1, 1], "tokens": [10, 30, 20, 40]}
    return {**RESULTS, "documents": documents, "document_loss": {"koff": {"loss": loss, "first": [0.0] * 4}}}


def test_vs_first_run_is_a_paired_difference_over_the_same_documents():
    rng = np.random.default_rng(0)
    tokens = np.array([10, 30, 20, 40])
    first = rng.uniform(1, 3, 4) * tokens
    shifted = first + 0.25 * tokens  # 0.25 nats/token worse on every document: every resample says so
    noisy = first + rng.normal(0, 0.5, 4) * tokens
    got = report.vs_first_run([[_scored(list(first))], [_scored(list(shifted))], [_scored(list(noisy))]],
                              resamples=200)
    assert got[:2] == ["reference", "+0.250 [+0.250, +0.250]"]
    per_domain = lambda loss: [loss[:2].sum() / 40, loss[2:].sum() / 60]  # noqa: E731
    assert got[2].startswith(f"{np.mean(per_domain(noisy)) - np.mean(per_domain(first)):+.3f} [")


def test_vs_first_run_refuses_runs_that_scored_other_documents():
    other = _scored([1.0] * 4)
    other["documents"] = {"domain": [0, 0, 1, 1], "tokens": [10, 30, 20, 41]}
    assert report.vs_first_run([[_scored([1.0] * 4)], [other]], resamples=200) == ["reference",
                                                                                "n/a (other documents)"]
    assert report.vs_first_run([[RESULTS], [RESULTS]], resamples=200) == ["n/a", "n/a"]


def test_vs_first_run_pairs_seeds_and_reads_the_seeds_both_runs_finished():
    rng = np.random.default_rng(1)
    tokens = np.array([10, 30, 20, 40])
    first = [rng.uniform(1, 3, 4) * tokens for _ in range(3)]
    shifted = [loss + shift * tokens for loss, shift in zip(first, (0.1, 0.3))]  # seed 2 unfinished
    got = report.vs_first_run([[_scored(list(x)) for x in first], [_scored(list(x)) for x in shifted]],
                              resamples=500)
    # Two seeds x documents: resampled seeds give 0.1, 0.2 or 0.3 whatever the documents drawn.
    assert got[1] == "+0.200 [+0.100, +0.300] (2 seeds)"
