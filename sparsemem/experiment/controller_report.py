"""The report's controller section: expected sparsity against its target, the final gap, gate polarisation.

Reads `metrics.jsonl` and `export/<variant>/gates.npz` (the final `log_alpha`, written
by `save_gates` after training), so it renders from the run directory alone.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from sparsemem.experiment.config import MASK_FROM
from sparsemem.experiment.rundir import RunDir
from sparsemem.koff import gates as gates_lib


def save_gates(run: RunDir, variant: str, log_alphas: dict) -> None:
    """Write the variant's final `log_alpha` arrays to `export/<variant>/gates.npz`."""
    np.savez(run.file("export", variant, "gates.npz"), **{k: np.asarray(v) for k, v in log_alphas.items()})


def _load_gates(run: RunDir, variant: str) -> dict[str, np.ndarray] | None:
    path = run.path / "export" / variant / "gates.npz"
    if not path.exists():
        return None
    with np.load(path) as data:
        return dict(data)


def controller_rows(metrics: list[dict], gates: dict[str, dict[str, np.ndarray]]) -> list[list]:
    """Per variant: final expected sparsity, target, final gap, largest gap after the ramp, polarised fraction."""
    rows = []
    for variant in sorted({m["variant"] for m in metrics}):
        steps = [m for m in metrics if m["variant"] == variant]
        final = steps[-1]
        flat = [m for m in steps if abs(m["target"] - final["target"]) < 1e-9]  # the schedule's flat part
        gap = max(abs(m["expected_sparsity"] - m["target"]) for m in flat)
        log_alphas = gates.get(variant)
        polarised = polarised_fraction(log_alphas) if log_alphas else final.get("polarised", float("nan"))
        rows.append([variant, final["expected_sparsity"], final["target"],
                     final["expected_sparsity"] - final["target"], gap, polarised])
    return rows


def polarised_fraction(log_alphas: dict[str, np.ndarray], threshold: float = 0.1) -> float:
    """Fraction of units with P(z > 0) < threshold or P(z = 1) > 1 - threshold (numpy twin of the controller's)."""
    keep = np.concatenate([np.asarray(gates_lib.keep_prob(la)).ravel() for la in log_alphas.values()])
    one = np.concatenate([np.asarray(gates_lib.prob_one(la)).ravel() for la in log_alphas.values()])
    return float(np.mean((keep < threshold) | (one > 1.0 - threshold)))


def plot_controller(metrics: list[dict], gates: dict[str, dict[str, np.ndarray]], path) -> None:
    """Left: expected sparsity and target per variant over the steps. Right: final P(z > 0) histogram."""
    fig = Figure(figsize=(12, 4))
    trajectory, histogram = fig.subplots(1, 2)
    for variant in sorted({m["variant"] for m in metrics}):
        steps = [m for m in metrics if m["variant"] == variant]
        line, = trajectory.plot([m["step"] for m in steps], [m["expected_sparsity"] for m in steps], label=variant)
        trajectory.plot([m["step"] for m in steps], [m["target"] for m in steps], "--", color=line.get_color(),
                        alpha=0.6)
    trajectory.set(xlabel="step", ylabel="expected sparsity (solid) / target (dashed)")
    trajectory.legend(fontsize=7)
    for variant, log_alphas in gates.items():
        keep = np.concatenate([np.asarray(gates_lib.keep_prob(la)).ravel() for la in log_alphas.values()])
        histogram.hist(keep, bins=np.linspace(0, 1, 21), histtype="step", label=variant)
    histogram.set(xlabel="final P(z > 0) per unit", ylabel="units", yscale="log")
    histogram.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def controller_section(run: RunDir, variants, metrics: list[dict], plots) -> list[str]:
    """Markdown lines of the controller section (and `plots/controller.png`); empty without metrics."""
    variants = [v for v in variants if v not in MASK_FROM]  # trained on another variant's mask: no gates of their own
    metrics = [m for m in metrics if m["variant"] in variants]
    if not metrics:
        return []
    gates = {v: g for v in variants if (g := _load_gates(run, v)) is not None}
    plot_controller(metrics, gates, plots / "controller.png")
    header = ["variant", "final expected sparsity", "target", "final gap", "max gap at the final target",
              "polarised units"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in controller_rows(metrics, gates)]
    return ["", "## Sparsity controller", "",
            "Expected sparsity of the gates against the scheduled target, and how decided the gates are at the "
            "end (polarised: P(z > 0) < 0.1 or P(z = 1) > 0.9; then the sampled gates training saw are the "
            "deterministic mask that is evaluated).", "", *table, "", "![controller](plots/controller.png)"]
