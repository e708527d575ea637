"""The report's controller section: expected sparsity against its target, the final gap, gate polarisation.

Reads `metrics.jsonl` and `export/<variant>/gates.npz` (the final `log_alpha`, written
by `save_gates` after training), so it renders from the run directory alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from sparsemem import files
from sparsemem.experiment.config import trains_gates
from sparsemem.experiment.variant_files import load_npz, save_npz
from sparsemem.experiment.rundir import RunDir
from sparsemem.koff import gates as gates_lib


def save_gates(run: RunDir, variant: str, log_alphas: dict) -> None:
    """Write the variant's final `log_alpha` arrays to `export/<variant>/gates.npz` (process 0 only, atomically)."""
    if run.primary:
        save_npz(run.file("export", variant, "gates.npz"), {k: np.asarray(v) for k, v in log_alphas.items()})


def mask_gap(scorer, log_alphas: dict, masks: dict, memory: dict | None, lora_scale: float, batches,
             samples: int = 4, seed: int = 0) -> dict[str, float]:
    """Mean loss (nats/token) on `batches` under `samples` draws of the gates and under the deterministic
    `masks`, both with `memory`: how far the network training saw is from the one evaluated."""
    def mean_loss(draws):
        loss = tokens = 0.0
        for batch in batches:
            for gate_values in draws:
                row_loss, row_tokens = scorer.row_losses(batch, masks=gate_values, memory=memory, lora_scale=lora_scale)
                loss, tokens = loss + row_loss.sum(), tokens + row_tokens.sum()
        return float(loss / tokens)

    keys = jax.random.split(jax.random.key(seed), samples)
    sampled = mean_loss([gates_lib.sample_all({k: jnp.asarray(v) for k, v in log_alphas.items()}, k) for k in keys])
    deterministic = mean_loss([masks])
    return {"sampled": sampled, "deterministic": deterministic, "gap": sampled - deterministic}


def save_controller(run: RunDir, variant: str, log_alphas: dict, gap: dict | None) -> None:
    """Write the final `log_alpha` (`gates.npz`) and the sampled vs deterministic loss (`controller.json`)."""
    save_gates(run, variant, log_alphas)
    if gap is not None:
        run.write_json(f"export/{variant}/controller.json", gap)


def _load_gates(run: RunDir, variant: str) -> dict[str, np.ndarray] | None:
    path = run.path / "export" / variant / "gates.npz"
    if not path.exists():
        return None
    return load_npz(path)


def controller_rows(metrics: list[dict], gates: dict[str, dict[str, np.ndarray]],
                    losses: dict[str, dict] | None = None) -> list[list]:
    """Per variant: final expected sparsity, target, final gap, largest gap at the final target, polarised
    fraction, held-out loss under sampled gates minus under the deterministic mask."""
    losses = losses or {}
    rows = []
    for variant in sorted({m["variant"] for m in metrics}):
        steps = [m for m in metrics if m["variant"] == variant]
        final = steps[-1]
        # The schedule's flat part, less its first step: a step's metric is taken before its update, so the
        # first step at the final target still shows the gates projected onto the previous step's target.
        flat = [m for m in steps if abs(m["target"] - final["target"]) < 1e-9][1:] or [final]
        gap = max(abs(m["expected_sparsity"] - m["target"]) for m in flat)
        log_alphas = gates.get(variant)
        polarised = polarised_fraction(log_alphas) if log_alphas else final.get("polarised", float("nan"))
        rows.append([variant, final["expected_sparsity"], final["target"],
                     final["expected_sparsity"] - final["target"], gap, polarised,
                     losses.get(variant, {}).get("gap", float("nan"))])
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
    files.write_png(path, fig)


def controller_section(run: RunDir, variants, metrics: list[dict], plots) -> list[str]:
    """Markdown lines of the controller section (and `plots/controller.png`); empty without metrics."""
    variants = [v for v in variants if trains_gates(v)]  # a fixed mask has no gates to control
    metrics = [m for m in metrics if m["variant"] in variants]
    if not metrics:
        return []
    gates = {v: g for v in variants if (g := _load_gates(run, v)) is not None}
    plot_controller(metrics, gates, plots / "controller.png")
    losses = {v: g for v in variants if (g := run.read_json(f"export/{v}/controller.json"))}
    header = ["variant", "final expected sparsity", "target", "final gap", "max gap at the final target",
              "polarised units", "loss sampled - deterministic (nats/token)"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in controller_rows(metrics, gates, losses)]
    return ["", "## Sparsity controller", "",
            "Expected sparsity of the gates against the scheduled target, and how decided the gates are at the "
            "end (polarised: P(z > 0) < 0.1 or P(z = 1) > 0.9; then the sampled gates training saw are the "
            "deterministic mask that is evaluated; the last column measures that on held-out text, with the "
            "variant's memories).", "", *table, "", "![controller](plots/controller.png)"]
