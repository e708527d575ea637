"""`sparsemem extend`: give a trained run new domains without touching what it already has.

The new domains get a memory table of their own (KV memory + LoRA, the run's memory
settings) trained by a `KoffTrainer` whose `fixed_mask` is the run's exported `koff`
mask (`export/koff/mask.npz`): every step is a memory step under that mask, and the
backbone is frozen as always. The run's own memory rows, mask, gates and checkpoints
are never written: they are bit-identical afterwards by construction, and training
costs nothing per existing domain (at hundreds of domains the old rows' optimiser
moments would otherwise ride along).

Each `extend` call is one *extension* (its domains, by name) recorded in
`extensions.json`; its state lives in `extend/<name>/` (checkpoints, metrics,
eval.json: new domains' held-out perplexity before and after training) and its rows
join the run's as `export/koff/memory/<domain>.npz`, so `sparsemem export` and
`sparsemem route` include them. If the run was already exported, the new domains'
modules are also written into that export folder with the backbone's fingerprints:
a deployment that holds the backbone loads just the new modules. Rerunning the same
command resumes an interrupted extension.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

from jax.experimental import multihost_utils

from sparsemem.checkpoints.run_state import RunCheckpointer
from sparsemem.data import pipeline
from sparsemem.experiment import setup
from sparsemem.experiment.config import koff_config
from sparsemem.experiment.domains import REGISTRY, NewDomain, extensions, routing_documents
from sparsemem.experiment.variant_files import load_mask, save_memory_rows
from sparsemem.experiment.metrics import MetricsLog
from sparsemem.experiment.report import write_report
from sparsemem.experiment.rundir import RunDir, Timer
from sparsemem.parallel import multihost
from sparsemem.train.loop import train
from sparsemem.train.trainer import KoffTrainer

log = logging.getLogger(__name__)

VARIANT = "koff"


class ExtendError(ValueError):
    """An extension cannot be made (unknown run state, clashing domain names, bad folder)."""


def parse_domains(languages: str | None, folders: list[str] | None) -> list[NewDomain]:
    """`--languages fr,es` and `--folder NAME=PATH` (repeatable) as `NewDomain`s."""
    domains = [NewDomain(lang.strip(), "libreoffice_help") for lang in (languages or "").split(",") if lang.strip()]
    for spec in folders or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ExtendError(f"--folder {spec!r} is not NAME=PATH (e.g. --folder manuals=~/docs/manuals)")
        path = pathlib.Path(path.strip()).expanduser()
        if not path.is_dir():
            raise ExtendError(f"--folder {name}: {path} is not a folder; give a folder of .txt/.jsonl documents")
        domains.append(NewDomain(name.strip(), "folder", str(path.resolve())))
    if not domains:
        raise ExtendError("nothing to add: give --languages fr,es and/or --folder NAME=PATH")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ExtendError(f"domain names {names} repeat; each new domain needs its own name")
    return domains


def _register(run: RunDir, config, domains: list[NewDomain]) -> str:
    """Record the extension (or find it again, to resume); returns its name."""
    groups = extensions(run)
    if domains in groups:
        return "+".join(d.name for d in domains)
    taken = set(setup.load_corpus(config).names) | {d.name for group in groups for d in group}
    clash = sorted(taken & {d.name for d in domains})
    if clash:
        raise ExtendError(f"{run.path} already has domain(s) {clash}; pick other names (the run has "
                          f"{', '.join(sorted(taken))})")
    run.write_json(REGISTRY, [[dataclasses.asdict(d) for d in group] for group in groups + [domains]])
    return "+".join(d.name for d in domains)


def _held_out_perplexity(trainer, state, held_out, tokenizer, config) -> dict:
    batches = pipeline.eval_batches(held_out, tokenizer, seq_len=config.data.seq_len,
                                    batch_size=config.eval.batch_size)
    result = trainer.evaluate(state, batches)  # the trainer moves text positions past the memory
    names = [s.name for s in held_out]
    return {key: dict(zip(names, map(float, result[key]))) for key in ("ppl_memory", "ppl_no_memory")}


def _sources(run: RunDir, config, domains: list[NewDomain]) -> tuple[list, list]:
    """The new domains' training and held-out text (a folder domain's first call links it and prepares its corpus)."""
    data_dir = config.data.data_dir or None
    train = [d.source(run, "train", data_dir) for d in domains]
    held_out = [setup.spread(d.source(run, config.eval.split, data_dir), config.eval.paragraphs) for d in domains]
    return train, held_out


def extend(run_dir: str, domains: list[NewDomain], steps: int | None = None) -> dict:
    """Train `domains`' memory on the run's frozen backbone and mask; returns the extension's eval.json.

    Runs as the run did (with `jax.distributed`: every process trains and evaluates, process 0 writes).
    """
    run = RunDir(run_dir)
    config = run.config()
    mesh = setup.mesh_for(config)
    with setup.open_run(run, config):
        name = _register(run, config, domains)
        with Timer(run, f"extend_{name}"):
            result = _train(run, config, mesh, domains, name, steps)
        if run.primary:
            write_report(run)
    return result


def _train(run: RunDir, config, mesh, domains: list[NewDomain], name: str, steps: int | None) -> dict:
    """Train extension `name` (resuming from its newest checkpoint), write its rows and eval.json."""
    home = run.path / "extend" / name
    if run.primary:
        home.mkdir(parents=True, exist_ok=True)
    decoder, tokenizer = setup.load_model(config, mesh)
    train_sources, held_out = multihost.primary_first("sparsemem extend sources",
                                                      lambda: _sources(run, config, domains))
    kcfg = koff_config(config, len(domains), VARIANT)
    trainer = KoffTrainer(decoder, kcfg, mesh, fixed_mask=load_mask(run, VARIANT))
    steps = config.train.steps if steps is None else steps  # as many steps as the run's variants
    checkpointer = RunCheckpointer(home / "checkpoints", max_to_keep=2)
    batches = setup.train_batches(config, train_sources, tokenizer)
    before = run.read_json(f"extend/{name}/before.json")
    state, resumed = setup.resume_or_start(checkpointer, trainer, batches, train_sources, tokenizer,
                                           f"extend {name}")
    if not resumed:
        before = _held_out_perplexity(trainer, state, held_out, tokenizer, config)
        run.write_json(f"extend/{name}/before.json", before)
    if int(state.step) < steps:
        metrics = MetricsLog(home, f"extend:{name}", [d.name for d in domains], total_steps=steps,
                             first_step=int(state.step), log_every=config.train.log_every)
        try:
            state, status = train(trainer, state, batches, num_steps=steps, checkpointer=checkpointer,
                                  save_every=config.train.save_every, data_state=batches.get_state,
                                  on_metrics=metrics, log_every=0)
        finally:
            metrics.close()
        if status == "preempted":
            raise ExtendError(f"[extend {name}] stopped at step {int(state.step)} on SIGTERM; rerun the same "
                              "command to resume")
    checkpointer.close()
    after = _held_out_perplexity(trainer, state, held_out, tokenizer, config)
    memory = multihost_utils.process_allgather(state.memory, tiled=True)  # every process takes part
    result = {"domains": [d.name for d in domains], "steps": steps, "before": before, "after": after}
    if run.primary:
        save_memory_rows(run, VARIANT, memory, [d.name for d in domains])
        run.write_json(f"extend/{name}/eval.json", result)
        _export_into_existing(run, config, decoder, tokenizer, memory, train_sources, kcfg.lora_scale)
    return result


def _export_into_existing(run: RunDir, config, decoder, tokenizer, memory, train_sources,
                          lora_scale: float) -> None:
    """Write the new modules into the run's export folder, if it has one (same backbone, same fingerprints)."""
    from sparsemem.serve.export_folder import add_modules  # noqa: PLC0415

    serve = run.path / "export" / VARIANT / "serve"
    if not (serve / "backbone" / "config.json").exists():
        log.info("no export in %s yet: `sparsemem export --run %s` will include the new domains", serve, run.path)
        return
    texts = {s.name: routing_documents(s, tokenizer, config.data.seq_len) for s in train_sources}
    add_modules(serve, decoder, load_mask(run, VARIANT), memory, [s.name for s in train_sources], lora_scale, texts)
    log.info("added modules %s to %s", ", ".join(s.name for s in train_sources), serve)
