"""Report tables from eval.json, including files written before translation questions existed."""

from sparsemem.experiment import report

RESULTS = {"domains": ["en-US", "de"], "settings": {"dense": "dense", "koff": "KOFF"}}
ACCURACY = {"dense": {"en-US": 0.5, "de": 0.25, "mean": 0.375}, "koff": {"en-US": 1.0, "de": 0.75, "mean": 0.875}}


def test_multiple_choice_sections_per_task_with_na_for_missing_domains():
    translation = {"dense": {"en-US": float("nan"), "de": 1.0, "mean": 1.0}}
    results = {**RESULTS, "mc": {"continuation": ACCURACY, "translation": translation},
               "mc_questions_per_domain": {"continuation": 8, "translation": 6}}
    text = "\n".join(report.mc_sections(results))
    assert "## Multiple choice: continuation" in text and "8 questions per domain" in text
    assert "## Multiple choice: translation (true translation of a en-US paragraph" in text
    assert "| dense | n/a | 1.000 | 1.000 |" in text


def test_eval_files_from_before_translation_questions_still_render():
    old = {**RESULTS, "mc": ACCURACY, "mc_questions_per_domain": 8}
    assert report.mc_sections(old) == report.mc_sections(
        {**RESULTS, "mc": {"continuation": ACCURACY}, "mc_questions_per_domain": {"continuation": 8}})
    assert "| KOFF | 1.000 | 0.750 | 0.875 |" in "\n".join(report.mc_sections(old))
