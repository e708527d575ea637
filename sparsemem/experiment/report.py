"""`report.md` and its PNG plots, from the files of a run directory only (so notebooks can do the same)."""

from __future__ import annotations

import json

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless and in notebooks

from sparsemem import files
from sparsemem.evaluation import bootstrap
from sparsemem.experiment import claims as claims_lib
from sparsemem.experiment.config import koff_config
from sparsemem.experiment.controller_report import controller_section
from sparsemem.experiment.metrics import read_metrics
from sparsemem.experiment.rundir import RunDir


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: ("n/a" if np.isnan(v) else f"{v:.3f}") if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def perplexity_table(results: dict, resamples: int) -> str:
    """Perplexity per setting and domain; with per-document losses also the geo. mean without the first
    target after BOS and the loss vs dense with its paired 95% interval (nats/token)."""
    domains = results["domains"]
    after_first = results.get("loss_after_first", {})
    vs_dense = {}
    if "document_loss" in results and "dense" in results["document_loss"]:
        loss, strata = claims_lib.loss_statistics(results)
        vs_dense = {name: bootstrap.bootstrap(bootstrap.difference(f, loss["dense"]), strata, resamples=resamples)
                    for name, f in loss.items() if name != "dense"}
    rows = [[results["settings"][name]] + [values[d] for d in domains] + [values["mean"]]
            + ([float(np.exp(after_first[name]["mean"]))] if after_first else [])
            + ([str(vs_dense[name]) if name in vs_dense else ""] if vs_dense else [])
            for name, values in results["perplexity"].items()]
    header = (["setting"] + domains + ["geo. mean"] + (["geo. mean without 1st target"] if after_first else [])
              + (["loss - dense [95% CI]"] if vs_dense else []))
    return _table(header, rows)


def claims_table(claims: list) -> str:
    """The claims with the statistic, its 95% interval, its own verdict and the Holm-adjusted one; resamples on
    which a statistic was not finite are counted under the table."""
    def adjusted(c):
        return ("n/a", "n/a") if c.adjusted_p is None else (f"{c.adjusted_p:.3g}", f"**{c.adjusted_verdict}**")

    table = _table(["claim", "statistic", "estimate [95% CI]", "verdict", "Holm-adjusted p", "adjusted verdict"],
                   [[c.text, c.statistic, str(c.interval), c.verdict, *adjusted(c)] for c in claims])
    tested = [c for c in claims if c.interval.p_value is not None]
    floor = min((2 * len(tested) / (c.interval.resamples + 1) for c in tested if c.interval.resamples), default=0.0)
    if floor >= 0.05:
        table += (f"\n\nHolm cannot decide any claim here: too few resamples (the smallest p-value a bootstrap of "
                  f"R resamples gives is 2/(R+1), times {len(tested)} claims is {floor:.3f} >= 0.05); raise "
                  "eval.resamples.")
    dropped = [f"{c.text}: {c.interval.dropped} of {c.interval.resamples}" for c in claims if c.interval.dropped]
    if dropped:
        table += "\n\nResamples left out because the statistic was not finite (a vanishing denominator): " + "; ".join(
            dropped) + "."
    return table


def swap_table(results: dict) -> str:
    domains, swap = results["domains"], results["swap"]["perplexity"]
    rows = [[f"memory {m}"] + [f"**{v:.3f}**" if i == j else f"{v:.3f}" for j, v in enumerate(row)]
            for i, (m, row) in enumerate(zip(domains, swap))]
    return _table(["memory \\ text"] + domains, rows)


MC_TITLES = {"continuation": "true continuation among 4",
             "translation": "true translation of a {source} paragraph among 4 paragraphs in the text's language, "
                            "scored by log p(candidate | source) - log p(candidate)"}


def mc_by_task(results: dict) -> tuple[dict, dict]:
    """`(accuracy[task][setting], questions_per_domain[task])`, also for eval.json files from before
    translation questions (one continuation task: `mc[setting]`, an int question count)."""
    count = results.get("mc_questions_per_domain", {})
    if isinstance(count, int):
        return {"continuation": results["mc"]}, {"continuation": count}
    return results["mc"], count


def mc_table(results: dict, task: str, resamples: int) -> str:
    """Accuracy per setting and domain; with per-question results also the mean's 95% interval."""
    domains = results["domains"]
    correct = results.get("mc_correct", {}).get(task, {})
    strata = np.asarray(results.get("mc_domain", {}).get(task, []))

    def interval(name):
        mean = claims_lib.mean_accuracy(np.asarray(correct[name], float), strata, len(domains))
        iv = bootstrap.bootstrap(mean, strata, resamples=resamples)
        return f"[{iv.low:.3f}, {iv.high:.3f}]"

    rows = [[results["settings"][name]] + [values[d] for d in domains] + [values["mean"]]
            + ([interval(name)] if name in correct and len(strata) else [])
            for name, values in mc_by_task(results)[0][task].items()]
    return _table(["setting"] + domains + ["mean"] + (["95% CI"] if correct else []), rows)


def mc_sections(results: dict, resamples: int) -> list[str]:
    """One heading and accuracy table per multiple-choice task."""
    out = []
    accuracy, count = mc_by_task(results)
    for task in accuracy:
        title = MC_TITLES[task].format(source=results["domains"][0])
        out += ["", f"## Multiple choice: {task} ({title}; {count[task]} questions per domain; accuracy, "
                "chance 0.25)", "", mc_table(results, task, resamples)]
    return out


def seed_evals(run: RunDir) -> list[dict]:
    """eval.json of the run and of each finished extra seed (`seeds/<k>/`), seed 0 first."""
    extra = sorted((p for p in (run.path / "seeds").glob("*") if (p / "eval.json").exists()),
                   key=lambda p: int(p.name) if p.name.isdigit() else 0)
    return [run.read_json("eval.json")] + [RunDir(p).read_json("eval.json") for p in extra]


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}"


def comparison_table(runs: list[RunDir], paired: tuple[str, ...] = ("koff",)) -> str:
    """One row per run: sparsity, seeds, geo-mean perplexity per setting (mean +- sd across seeds), swap wins,
    MC accuracy, the LAPE effect of KOFF's mask (seed 0) with its interval, and for each setting in `paired`
    its loss against the first run's with an interval paired by seed and document (`vs_first_run`)."""
    evals = [seed_evals(run) for run in runs]
    settings = list(dict.fromkeys(name for seeds in evals for name in seeds[0]["perplexity"]))
    accuracies = [[mc_by_task(results)[0] for results in seeds] for seeds in evals]
    tasks = list(dict.fromkeys(task for seeds in accuracies for task in seeds[0]))
    header = (["run", "sparsity", "seeds"] + [evals[0][0]["settings"].get(n, n) for n in settings]
              + ["own memory best"] + [f"MC {task} (KOFF)" for task in tasks]
              + ["LAPE: specific neurons removed vs chance (KOFF)"]
              + [f"{evals[0][0]['settings'].get(n, n)} loss - first run [95% CI]" for n in paired])
    vs_first = zip(*(vs_first_run(evals, n, resamples=runs[0].config().eval.resamples) for n in paired))
    rows = []
    for run, seeds, accuracy, differences in zip(runs, evals, accuracies, vs_first):
        analysis = run.read_json("analysis.json") or {"tests": {}}
        specific = analysis["tests"].get("koff", {}).get("specific", {}).get("effect")
        rows.append([run.path.name, run.config().koff.target_sparsity, len(seeds)]
                    + [_mean_sd([r["perplexity"].get(n, {}).get("mean", float("nan")) for r in seeds])
                       for n in settings]
                    + [f"{seeds[0]['swap']['diagonal_wins']}/{len(seeds[0]['domains'])}"]
                    + [_mean_sd([a.get(task, {}).get("koff", {}).get("mean", float("nan")) for a in accuracy])
                       for task in tasks]
                    + [str(bootstrap.Interval(**specific)) if specific else "n/a", *differences])
    return _table(header, rows)


def vs_first_run(runs: list[list[dict]], setting: str = "koff", *, resamples: int) -> list[str]:
    """Each run's `setting` loss minus the first run's (nats/token), paired by seed and document, with the
    claims' two-way 95% interval over the seeds both runs finished x the documents: the comparison a sweep
    needs. `runs` holds each run's eval.json per seed (`seed_evals`); runs that scored other documents get
    "n/a"."""
    first = runs[0]
    if "document_loss" not in first[0] or setting not in first[0]["document_loss"]:
        return ["n/a"] * len(runs)
    reference = [claims_lib.loss_statistics(results) for results in first]
    strata = reference[0][1]
    out = ["reference"]
    for seeds in runs[1:]:
        if any(results.get("documents") != first[0]["documents"] or results["domains"] != first[0]["domains"]
               or setting not in results.get("document_loss", {}) for results in seeds):
            out.append("n/a (other documents)")
            continue
        paired = [bootstrap.difference(claims_lib.loss_statistics(results)[0][setting], reference[k][0][setting])
                  for k, results in enumerate(seeds[:len(first)])]
        interval = str(bootstrap.bootstrap(paired, strata, resamples=resamples))
        out.append(interval if len(paired) == 1 else f"{interval} ({len(paired)} seeds)")
    return out


def seeds_table(runs_results: list[dict]) -> str:
    """Geo-mean perplexity per setting: mean +- sd across seeds."""
    settings = list(runs_results[0]["perplexity"])
    return _table(["setting", f"geo. mean perplexity over {len(runs_results)} seeds"],
                  [[runs_results[0]["settings"][n], _mean_sd([r["perplexity"].get(n, {}).get("mean", float("nan"))
                                                              for r in runs_results])] for n in settings])


def _many_lines(ax) -> None:
    """20 distinct colours on `ax`: the default cycle repeats after 10 and a run has up to 12 settings."""
    ax.set_prop_cycle(color=colormaps["tab20"].colors)


def plot_positions(results: dict, path) -> None:
    """Mean loss by target offset in the document (0: the first token after BOS), per setting."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    _many_lines(ax)
    for name, curve in results["position_loss"].items():
        ax.plot(range(len(curve["loss"])), curve["loss"], "o-", label=results["settings"][name], markersize=3)
    labels = max((c["offsets"] for c in results["position_loss"].values()), key=len)
    ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax.set_xlabel("target offset in the document")
    ax.set_ylabel("mean loss (nats)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    files.write_png(path, fig)


def plot_training(metrics: list[dict], path, gate_steps: int | None = None) -> None:
    """Loss and expected sparsity (each variant's target dashed in its colour) per step; lambda1 only when a
    Lagrangian controller moved it (the projection controller has no multiplier); a line where the mask froze."""
    variants = sorted({m["variant"] for m in metrics})
    lagrangian = any(m.get("lambda1", 0.0) != 0.0 for m in metrics)
    titles = ["train loss (nats/token)", "expected sparsity (prunable)"] + (["Lagrange multiplier"] if lagrangian else [])
    fig = Figure(figsize=(5 * len(titles), 4))
    axes = fig.subplots(1, len(titles))
    _many_lines(axes[0])
    for v in variants:
        rows = [m for m in metrics if m["variant"] == v]
        steps = [m["step"] for m in rows]
        (line,) = axes[0].plot(steps, [m["loss"] for m in rows], label=v)
        axes[1].plot(steps, [m["expected_sparsity"] for m in rows], color=line.get_color(), label=v)
        axes[1].plot(steps, [m["target"] for m in rows], "--", color=line.get_color(), linewidth=0.8)
        if lagrangian:
            axes[2].plot(steps, [m["lambda1"] for m in rows], color=line.get_color(), label=v)
    axes[1].plot([], [], "k--", linewidth=0.8, label="target")
    for ax, title in zip(axes, titles):
        if gate_steps is not None and gate_steps < max(m["step"] for m in metrics):
            ax.axvline(gate_steps, color="grey", linestyle=":", label="mask frozen")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.write_png(path, fig)


def plot_sparsity(sparsities: dict[str, dict], path) -> None:
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)
    for variant, s in sparsities.items():
        layers = np.arange(len(s["heads_kept_per_layer"]))
        axes[0].plot(layers, 1 - np.array(s["heads_kept_per_layer"]) / s["num_heads"], "o-", label=variant)
        axes[1].plot(layers, 1 - np.array(s["neurons_kept_per_layer"]) / s["d_ff"], "o-", label=variant)
    for ax, title in zip(axes, ("removed query heads per layer", "removed MLP neurons per layer")):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction removed")
        ax.legend()
    fig.tight_layout()
    files.write_png(path, fig)


def plot_swap(results: dict, path) -> None:
    swap, domains = np.array(results["swap"]["perplexity"]), results["domains"]
    fig = Figure(figsize=(1.2 * len(domains) + 2, 1.0 * len(domains) + 1.5))
    ax = fig.subplots()
    relative = swap / np.diag(swap)[None, :]
    im = ax.imshow(relative, cmap="viridis")
    for i in range(len(domains)):
        for j in range(len(domains)):
            ax.text(j, i, f"{swap[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("text of domain")
    ax.set_ylabel("memory of domain")
    ax.set_title("perplexity (colour: relative to own memory)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    files.write_png(path, fig)


def plot_analysis(analysis: dict, path) -> None:
    variants = list(analysis["tests"])
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)
    x = np.arange(len(variants))
    tests = [analysis["tests"][v]["specific"] for v in variants]
    axes[0].bar(x - 0.25, [t["removed_among_all"] for t in tests], 0.25, label="all neurons")
    axes[0].bar(x, [t["removed_among_chosen"] for t in tests], 0.25, label="language-specific")
    axes[0].bar(x + 0.25, [t["chance_mean"] for t in tests], 0.25,
                yerr=[[0] * len(tests), [t["chance_95"] - t["chance_mean"] for t in tests]],
                label="chance (layer-stratified, 95%)")
    axes[0].set_xticks(x, variants)
    axes[0].set_ylabel("fraction removed by the mask")
    axes[0].legend(fontsize=8)
    hist = analysis["entropy_hist"][variants[0]]
    edges = np.linspace(0, analysis["entropy_max"], len(hist["kept"]) + 1)
    for name in ("kept", "removed"):
        counts = np.array(hist[name], float)
        axes[1].stairs(counts / max(counts.sum(), 1), edges, label=f"{name} ({variants[0]})")
    axes[1].set_xlabel("LAPE (entropy over languages)")
    axes[1].set_ylabel("fraction of neurons")
    axes[1].legend()
    fig.tight_layout()
    files.write_png(path, fig)


def routing_tables(result: dict) -> str:
    """Markdown: accuracy by prompt length, confusion at the perplexity prompt length, perplexity, cost."""
    lengths, names = result["lengths"], result["domains"]
    lines = ["| router | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for kind, by_n in result["accuracy"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{by_n[str(n)]['mean']:.1%}" for n in lengths) + " |")
    n = str(result["ppl_prompt"])
    lines += ["", f"Centroid routing at {n} tokens (rows: true domain, columns: routed memory):", "",
              "| | " + " | ".join(result["memories"]) + " |", "|---|" + "---|" * len(result["memories"])]
    lines += [f"| {d} | " + " | ".join(map(str, row)) + " |"
              for d, row in zip(names, result["confusion"]["centroid"][n])]
    p = result["perplexity"]
    lines += ["", f"Perplexity of the continuation after a {n}-token prompt:", "",
              "| domain | oracle memory | centroid-routed | likelihood-routed | no memory |", "|---|---|---|---|---|"]
    lines += [f"| {d} | {p['oracle'][d]:.2f} | {p['routed'][d]:.2f} | {p['likelihood_routed'][d]:.2f} | "
              f"{p['no_memory'][d]:.2f} |" for d in names + ["geomean"]]
    c = result["cost"]
    lines += ["", f"Cost for a batch of {c['batch']} prompts of {c['prompt_tokens']} tokens: centroid routing "
              f"{c['centroid_s'] * 1e3:.1f} ms ({c['centroid_share']:.2%} of generating {c['generated_tokens']} "
              f"tokens, {c['generate_s']:.2f} s), likelihood routing {c['likelihood_s'] * 1e3:.1f} ms "
              f"({c['likelihood_share']:.1%})."]
    return "\n".join(lines)


def added_domain_sections(run: RunDir) -> list[str]:
    """Markdown for domains added by `sparsemem extend` (held-out perplexity before/after) and `sparsemem route`."""
    out = []
    extensions = sorted((run.path / "extend").glob("*/eval.json")) if (run.path / "extend").exists() else []
    rows = []
    for path in extensions:
        result = json.loads(path.read_text())
        before, after = result["before"], result["after"]
        rows += [[d, result["steps"], after["ppl_no_memory"][d], before["ppl_memory"][d], after["ppl_memory"][d]]
                 for d in result["domains"]]
    if rows:
        out += ["", "## Added domains (`sparsemem extend`: new memory rows on the frozen mask and backbone)", "",
                _table(["domain", "steps", "no memory", "memory at its initialisation", "memory trained"], rows)]
    route = run.read_json("route.json")
    if route:
        out += ["", "## Routing (`sparsemem route`: top-1 accuracy by prompt length, held-out text)", "",
                routing_tables(route)]
    return out


def write_report(run: RunDir) -> str:
    """Render `report.md` and `plots/*.png` from the run directory; returns the markdown."""
    config = run.config()
    results, analysis, timing = run.read_json("eval.json"), run.read_json("analysis.json"), run.read_json("timing.json")
    sparsities = {v: run.read_json(f"export/{v}/sparsity.json") for v in config.train.variants}
    sparsities = {v: s for v, s in sparsities.items() if s}
    metrics = read_metrics(run.path)
    out = [f"# KOFF run `{config.name}`", ""]
    out.append(f"Model `{config.model.source}`{' ' + config.model.path if config.model.path else ''}, corpus "
               f"`{config.data.corpus}` ({', '.join(config.data.languages) if config.data.corpus != 'folder' else config.data.folder}), "
               f"{config.train.steps} steps x {config.data.batch_size} x {config.data.seq_len} tokens per variant, "
               f"target sparsity {config.koff.target_sparsity} over {config.koff.sparsity_over} parameters, "
               f"{config.koff.memory_slots} KV slots, LoRA rank {config.koff.lora_rank} on "
               f"{', '.join(config.koff.lora_targets) or 'nothing'}. Resolved config: `config.json`.")
    if timing:
        out += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
                + f"; total {sum(timing.values()):.0f} s ({sum(timing.values()) / 60:.1f} min)."]
    plots = run.path / "plots"
    plots.mkdir(exist_ok=True)
    if sparsities:
        out += ["", "## Sparsity (deterministic masks)", "",
                _table(["variant", "target", "realised (prunable)", "realised (all params)"],
                       [[v, s["target"], s["prunable"], s["all"]] for v, s in sparsities.items()])]
        plot_sparsity(sparsities, plots / "sparsity_per_layer.png")
        out += ["", "![sparsity per layer](plots/sparsity_per_layer.png)"]
    if metrics:
        gate_steps = koff_config(config, num_domains=1).gate_steps
        plot_training(metrics, plots / "training.png", gate_steps)
        out += ["", "## Training", "", "![training curves](plots/training.png)"]
    out += controller_section(run, config.train.variants, metrics, plots)
    if results:
        unit = config.data.unit if config.data.corpus == "libreoffice_help" else "document"
        every_seed = seed_evals(run)
        claims = claims_lib.all_claims(every_seed, analysis, resamples=config.eval.resamples)
        over = f"{len(every_seed)} seeds x documents" if len(every_seed) > 1 else "documents"
        out += ["", f"## The paper's claims ({config.eval.split} split; paired bootstrap 95% intervals over {over}, "
                f"{config.eval.resamples} resamples; Holm-adjusted over the {len(claims)} claims)", "",
                claims_table(claims) if claims else "(no per-document "
                "results in this eval.json)",
                "", f"## Held-out perplexity ({config.eval.split} split, up to {config.eval.documents} {unit}s per "
                "domain)", "", perplexity_table(results, config.eval.resamples)]
        if "position_loss" in results:
            plot_positions(results, plots / "positions.png")
            out += ["", "![loss by position](plots/positions.png)"]
        if len(every_seed) > 1:
            out += ["", f"## Across seeds ({len(every_seed)} seeds: data order, initialisation, random mask)", "",
                    seeds_table(every_seed)]
        out += ["", f"## Memory swap (perplexity of text j with memory i; KOFF mask; up to {config.eval.paragraphs} "
                "aligned paragraphs per domain)", "", swap_table(results), "", "![memory swap](plots/swap.png)"]
        plot_swap(results, plots / "swap.png")
        out += mc_sections(results, config.eval.resamples)
    if analysis and "tokens" in analysis:
        rows = [[v, name, t["neurons"], t["removed_among_chosen"], t["removed_among_all"], t["chance_mean"],
                 t["p_removed"], t["p_kept"], str(bootstrap.Interval(**t["effect"]))]
                for v, sets in analysis["tests"].items() for name, t in sets.items()]
        out += ["", "## Language-specific and language-general neurons (LAPE) vs the mask", "",
                f"Activation statistics over {json.dumps(analysis['tokens'])} held-out tokens per domain. "
                f"Language-specific neurons by dominant language: {json.dumps(analysis['specific_by_domain'])}.", "",
                _table(["mask", "neurons", "count", "removed among them", "removed among all", "chance",
                        "p (removed more)", "p (removed less)", "removed - chance [95% CI]"], rows),
                "", "![LAPE](plots/lape.png)"]
        plot_analysis(analysis, plots / "lape.png")
    out += added_domain_sections(run)
    text = "\n".join(out) + "\n"
    files.atomic_write(run.path / "report.md", lambda tmp: tmp.write_text(text))  # readers never see half a report
    return text
