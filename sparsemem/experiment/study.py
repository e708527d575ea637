"""`sparsemem study`: one question asked at several training budgets x seeds, answered in one report.

A study config is an experiment config with `study.budgets`. For every budget `b` and seed
`k < train.seeds` the experiment runs with `train.steps = b` (data and KOFF seeds shifted by
`k`, as `run.seed_config` does) into `<workdir>/steps_<b>/seed_<k>/`: a cell is an ordinary,
resumable `sparsemem run`. A cell whose eval.json exists is finished and never touched again
(so its checkpoints may be deleted, or the cell's result copied in from elsewhere). Cells run
budget by budget, smallest first, every seed before the next budget, so a study stopped early
holds whole budgets.

The report (`study.json`, `study.md`, `plots/budget.png`) reads every finished budget: each
setting's loss with a 95% interval over seeds x documents (`bootstrap`), and the claims of
`claims.loss_claims` at every budget as one family, Holm-adjusted together.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from sparsemem import files
from sparsemem.evaluation import bootstrap
from sparsemem.experiment import claims as claims_lib
from sparsemem.experiment.rundir import RunDir

log = logging.getLogger(__name__)


def cell_path(workdir, steps: int, seed: int):
    return files.as_path(workdir) / f"steps_{steps}" / f"seed_{seed}"


def cell_config(config: ml_collections.ConfigDict, steps: int, seed: int) -> ml_collections.ConfigDict:
    """The experiment of one cell: `steps` training steps, seed `seed`, one seed per run, no LAPE analysis."""
    from sparsemem.experiment.run import seed_config  # noqa: PLC0415 (imports jax)

    config = ml_collections.ConfigDict(config.to_dict())
    config.train.steps = steps
    config.study.budgets = ()
    return seed_config(config, seed)


def cells(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """`(steps, seed)` of every cell, in the order they run."""
    if not config.study.budgets:
        raise ValueError("the config sets no study.budgets: a study needs training budgets, e.g. "
                         "--set 'study.budgets=(20, 80)' (or use `sparsemem run` for one budget)")
    return [(steps, seed) for steps in sorted(config.study.budgets) for seed in range(config.train.seeds)]


def run_study(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
    """Run (or resume) every unfinished cell of the study `config`, then write its report; returns the workdir."""
    from sparsemem.experiment.run import run  # noqa: PLC0415 (imports jax)

    workdir = workdir or os.path.join("runs", config.name)
    todo = cells(config)
    for i, (steps, seed) in enumerate(todo, 1):
        path = cell_path(workdir, steps, seed)
        if (path / "eval.json").exists():
            continue
        log.info("study cell %d/%d: %d steps, seed %d -> %s", i, len(todo), steps, seed, path)
        run(cell_config(config, steps, seed), os.fspath(path))
        write_report(config, workdir)  # a finished cell is in the report at once
    write_report(config, workdir)
    return workdir


def finished(config: ml_collections.ConfigDict, workdir) -> dict[int, list[dict]]:
    """`{steps: [eval.json of seed 0, 1, ...]}` for every budget whose cells have all finished."""
    out = {}
    for steps in sorted(config.study.budgets):
        evals = [RunDir(cell_path(workdir, steps, seed)).read_json("eval.json") for seed in range(config.train.seeds)]
        if all(evals):
            out[steps] = evals
    return out


def setting_intervals(per_seed: list[dict], resamples: int) -> dict[str, bootstrap.Interval]:
    """Each setting's domain-mean loss (nats/token) with its 95% interval over seeds x documents."""
    claims_lib.same_documents(per_seed)
    statistics = [claims_lib.loss_statistics(results) for results in per_seed]
    strata = statistics[0][1]
    return {name: bootstrap.bootstrap([s[0][name] for s in statistics], strata, resamples=resamples)
            for name in statistics[0][0]}


def summarise(config: ml_collections.ConfigDict, workdir) -> dict:
    """The study's numbers as a JSON-ready dict: per budget, the settings' losses and the claims (one family)."""
    resamples = config.eval.resamples
    budgets = finished(config, workdir)
    losses, family, where = {}, [], []
    for steps, per_seed in budgets.items():
        losses[steps] = setting_intervals(per_seed, resamples)
        found = claims_lib.loss_claims(per_seed, resamples=resamples)
        family += found
        where += [steps] * len(found)
    family = claims_lib.adjust(family)
    labels = next(iter(budgets.values()))[0]["settings"] if budgets else {}
    return {"budgets": list(budgets), "seeds": config.train.seeds, "resamples": resamples, "labels": labels,
            "documents": {steps: len(per_seed[0]["documents"]["domain"]) for steps, per_seed in budgets.items()},
            "loss": {steps: {name: iv.as_dict() for name, iv in by.items()} for steps, by in losses.items()},
            "claims": [{"steps": steps, **claim.as_dict()} for steps, claim in zip(where, family)]}


def write_report(config: ml_collections.ConfigDict, workdir) -> dict:
    """`study.json`, `study.md` and `plots/budget.png` from the finished budgets (atomic writes)."""
    root = files.as_path(workdir)
    summary = summarise(config, root)
    files.write_json(root / "study.json", summary)
    plot = root / "plots" / "budget.png"
    if summary["budgets"]:
        plot_budgets(summary, plot)
    text = render(config, summary)
    files.atomic_write(root / "study.md", lambda tmp: tmp.write_text(text))
    return summary


def _row(cells_: list[str]) -> str:
    return "| " + " | ".join(cells_) + " |"


def render(config: ml_collections.ConfigDict, summary: dict) -> str:
    """The study's markdown report."""
    budgets, labels = summary["budgets"], summary["labels"]
    out = [f"# Study `{config.name}`", "",
           f"Training budgets {tuple(sorted(config.study.budgets))} steps x {config.data.batch_size} x "
           f"{config.data.seq_len} tokens per variant (every variant the same optimiser steps on the same tokens), "
           f"{config.train.seeds} seeds, target sparsity {config.koff.target_sparsity} over "
           f"{config.koff.sparsity_over} parameters, gate start `{config.koff.gate_init}` for `koff`, masks that train "
           f"with memories frozen after {config.koff.gate_fraction:g} of the steps (the memories train on under "
           f"them), {config.koff.gate_samples} gate samples per step, evaluated on "
           f"the {config.eval.split} split (up to {config.eval.documents} documents per domain). Intervals: 95%, "
           f"bootstrap over seeds x documents, {summary['resamples']} resamples. Finished budgets: "
           f"{budgets or 'none yet'}."]
    if not budgets:
        return "\n".join(out) + "\n"
    out += ["", "## Loss per setting (nats per token, mean over domains; perplexity = exp)", "",
            _row(["setting"] + [f"{steps} steps" for steps in budgets]), "|" + "---|" * (len(budgets) + 1)]
    for name in summary["loss"][budgets[0]]:
        out.append(_row([labels.get(name, name)] + [
            f"{np.exp(iv['estimate']):.2f} ({str(bootstrap.Interval(**iv))})" if iv else "n/a"
            for iv in (summary["loss"][steps].get(name) for steps in budgets)]))
    out += ["", "![loss vs training budget](plots/budget.png)", "",
            f"## Claims ({len(summary['claims'])} in one family: raw verdicts from their intervals, adjusted by "
            "Holm's method over all of them)", "",
            _row(["steps", "claim", "statistic", "estimate [95% CI]", "verdict", "Holm-adjusted p", "adjusted verdict"]),
            "|---|---|---|---|---|---|---|"]
    for c in summary["claims"]:
        adjusted = "n/a" if c["adjusted_p"] is None else f"{c['adjusted_p']:.3g}"
        out.append(_row([str(c["steps"]), c["claim"], c["statistic"], str(bootstrap.Interval(**c["interval"])),
                         c["verdict"], adjusted, f"**{c['adjusted_verdict']}**"]))
    return "\n".join(out) + "\n"


def plot_budgets(summary: dict, path) -> None:
    """Loss vs training steps per setting, with 95% intervals over seeds x documents (log-scale steps)."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    budgets = summary["budgets"]
    names = list(summary["loss"][budgets[0]])
    colours = [f"C{i % 10}" for i in range(len(names))]
    for i, (name, colour) in enumerate(zip(names, colours)):
        points = [(steps, summary["loss"][steps][name]) for steps in budgets if name in summary["loss"][steps]]
        x = np.array([steps for steps, _ in points], float) * (1 + 0.02 * (i - len(names) / 2))  # no hidden bars
        y = np.array([iv["estimate"] for _, iv in points])
        err = np.array([[iv["estimate"] - iv["low"] for _, iv in points], [iv["high"] - iv["estimate"] for _, iv in points]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour, linestyle="-" if len(x) > 1 else "none",
                    label=summary["labels"].get(name, name))
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("training steps per variant")
    ax.set_ylabel("held-out loss (nats/token, mean over domains)")
    ax.set_title(f"Loss vs training budget ({summary['seeds']} seeds; 95% intervals over seeds x documents)")
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_png(path, fig, dpi=120)
