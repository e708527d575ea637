"""`sparsemem extend` on the CI run: old rows, mask and gates untouched; the new domain learns; modules load."""

import hashlib
import json
import pathlib

import numpy as np
import pytest

from sparsemem import cli
from sparsemem.checkpoints.memory_module import ModuleMismatchError, load_memory_module
from sparsemem.serve.deploy import Deployment

ROOT = pathlib.Path(__file__).parent.parent
CI = str(ROOT / "experiments" / "configs" / "ci.py")
QUICK = ["train.variants=('koff',)", "koff.memory_lr=0.01", "analysis.enabled=False", "eval.mc_questions=0",
         "eval.paragraphs=4"]
OLD = ("de", "en-US")

pytestmark = pytest.mark.slow


def write_folder(path: pathlib.Path, documents: int = 120) -> pathlib.Path:
    """A small technical corpus with a vocabulary of its own (enough documents for every split)."""
    path.mkdir(parents=True)
    for i in range(documents):
        text = " ".join(f"Valve V{(i + j) % 9} opens when sensor S{(i * j) % 5} reads {j * 7 % 13} bar."
                        for j in range(6))
        (path / f"doc{i:03d}.txt").write_text(text)
    return path


def digests(run: pathlib.Path) -> dict[str, str]:
    """sha256 of every file the run had before extending (mask, memory rows, checkpoints, exported modules)."""
    files = [p for p in run.rglob("*") if p.is_file() and "extend" not in p.parts and p.name not in (
        "timing.json", "extensions.json")]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def extended(tmp_path_factory, demo_folder):
    root = tmp_path_factory.mktemp("extend")
    run = root / "ci"
    overrides = [arg for value in QUICK for arg in ("--set", value)]
    assert cli.main(["run", "--config", CI, "--workdir", str(run), *overrides]) == 0
    assert cli.main(["export", "--run", str(run)]) == 0
    before = digests(run)
    folder = write_folder(root / "valves")
    assert cli.main(["extend", "--run", str(run), "--folder", f"valves={folder}", "--steps", "6"]) == 0
    return run, before, folder


def test_old_rows_mask_gates_and_modules_stay_bit_identical(extended):
    run, before, _ = extended
    after = digests(run)
    derived = ("report.md", "plots/")  # the report is re-rendered to show the added domains
    kept = {name: digest for name, digest in before.items() if not name.startswith(derived)}
    assert {name: after.get(name) for name in kept} == kept
    assert "export/koff/memory/valves.npz" in after  # the new row joins the run's


def test_new_domain_loss_falls(extended):
    run, _, _ = extended
    result = json.loads((run / "extend" / "valves" / "eval.json").read_text())
    assert result["steps"] == 6
    assert result["after"]["ppl_memory"]["valves"] < 0.9 * result["before"]["ppl_memory"]["valves"]
    lines = (run / "extend" / "valves" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, 7))
    report = (run / "report.md").read_text()
    assert "## Added domains" in report and "| valves | 6 |" in report


def test_new_module_loads_next_to_the_old_ones_and_reexport_agrees(extended, tmp_path):
    run, _, _ = extended
    serve = run / "export" / "koff" / "serve"
    deployment = Deployment.load(serve)
    assert deployment.domains == ("de", "en-US", "valves")
    backbone = json.loads((serve / "backbone" / "config.json").read_text())["sparsemem"]
    new = load_memory_module(serve / "modules" / "valves", base_fingerprint=backbone["base_fingerprint"],
                             mask_fingerprint=backbone["mask_fingerprint"])
    assert new.centroid is not None and new.routing_layer == load_memory_module(serve / "modules" / "de").routing_layer
    # A fresh export of the whole run holds the same module, centroid included.
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = load_memory_module(tmp_path / "again" / "modules" / "valves")
    for name, array in new.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array)
    np.testing.assert_allclose(again.centroid, new.centroid, rtol=1e-5, atol=1e-6)


def test_generate_routes_auto_prompts(extended, capsys):
    run, _, _ = extended
    prompt = "Valve V3 opens when sensor S2 reads 5 bar. Valve V4 opens when sensor S1 reads 12 bar."
    assert cli.main(["generate", "--run", str(run), "--domain", "auto", "--prompt", prompt,
                     "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(prompt)


def test_rerun_resumes_and_clashing_names_are_refused(extended, capsys):
    run, _, folder = extended
    result = json.loads((run / "extend" / "valves" / "eval.json").read_text())
    assert cli.main(["extend", "--run", str(run), "--folder", f"valves={folder}", "--steps", "6"]) == 0
    assert json.loads((run / "extend" / "valves" / "eval.json").read_text())["after"] == result["after"]
    with pytest.raises(SystemExit, match=r"already has domain\(s\) \['de'\]"):
        cli.main(["extend", "--run", str(run), "--languages", "de"])
    with pytest.raises(SystemExit, match="not NAME=PATH"):
        cli.main(["extend", "--run", str(run), "--folder", "nopath"])


def test_modules_for_another_mask_are_refused(extended):
    from sparsemem.experiment.variant_files import load_mask
    from sparsemem.experiment.rundir import RunDir
    from sparsemem.experiment.setup import load_model
    from sparsemem.serve.export_folder import add_modules

    run, _, _ = extended
    config = RunDir(run).config()
    decoder, _ = load_model(config, None)
    mask = load_mask(RunDir(run), "koff")
    flipped = {**mask, "neuron": 1 - mask["neuron"]}
    table = {k: v[None] for k, v in np.load(run / "export" / "koff" / "memory" / "valves.npz").items()}
    with pytest.raises(ModuleMismatchError, match="not exported from the model and mask"):
        add_modules(run / "export" / "koff" / "serve", decoder, flipped, table, ["other"], 1.0, {"other": [[2, 5]]})


def test_route_reports_every_domain_of_the_extended_run(extended, capsys):
    run, _, _ = extended
    assert cli.main(["route", "--run", str(run), "--documents", "2", "--lengths", "8,16", "--ppl-prompt", "8",
                     "--continuation", "8"]) == 0
    result = json.loads((run / "route.json").read_text())
    assert result["domains"] == ["en-US", "de", "valves"] and result["memories"] == ["de", "en-US", "valves"]
    for kind in ("centroid", "likelihood"):
        assert np.sum(result["confusion"][kind]["16"], 1).tolist() == [2, 2, 2]
    assert set(result["perplexity"]["oracle"]) == {"en-US", "de", "valves", "geomean"}
    assert "| centroid |" in capsys.readouterr().out
    assert "## Routing" in (run / "report.md").read_text()
