"""`sparsemem run`: train every variant, export, evaluate, analyse and report, resumably.

Each phase leaves its result in the run directory and is skipped when that result
is there: training resumes from the variant's latest checkpoint (with the data
iterator's state), evaluation and analysis rerun only if their JSON is missing,
and the report is rewritten every time.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from sparsemem.analysis import lape
from sparsemem.checkpoints.run_state import RunCheckpointer
from sparsemem.data import pipeline
from sparsemem.koff import baselines
from sparsemem.evaluation import multiple_choice, settings as settings_lib, suite
from sparsemem.evaluation.scoring import Scorer
from sparsemem.experiment import setup
from sparsemem.evaluation.documents import document_batches
from sparsemem.experiment.config import koff_config, mask_source
from sparsemem.experiment.controller_report import mask_gap, save_controller
from sparsemem.experiment.variant_files import export_variant, load_mask, load_npz, save_npz
from sparsemem.experiment.metrics import MetricsLog
from sparsemem.experiment.report import write_report
from sparsemem.experiment.rundir import RunDir, Timer
from sparsemem.train.loop import train
from sparsemem.train.trainer import KoffTrainer, after_memory

log = logging.getLogger(__name__)


# Between a source paragraph and its translation in translation questions (from the first domain).
TRANSLATION_SEPARATOR = "\n\n"


class Interrupted(RuntimeError):
    """The run stopped on SIGTERM (in training: after saving a checkpoint); the same command resumes it."""


def default_workdir(config: ml_collections.ConfigDict) -> str:
    return os.path.join("runs", config.name)


def _steps(config, trainer: KoffTrainer) -> int:
    """Steps a variant trains: all with memory; without memory, the gate steps (a fixed mask: none)."""
    if trainer.kcfg.has_memory:
        return config.train.steps
    return 0 if trainer.fixed_mask is not None else trainer.kcfg.gate_steps  # nothing trains under a frozen mask


def _train_variant(run: RunDir, config, trainer: KoffTrainer, variant: str, corpus: setup.Corpus, tokenizer):
    kcfg = trainer.kcfg
    steps = _steps(config, trainer)
    checkpointer = RunCheckpointer(run.path / "checkpoints" / variant, max_to_keep=2)
    batches = setup.train_batches(config, corpus.train, tokenizer)
    state, _ = setup.resume_or_start(checkpointer, trainer, batches, corpus.train, tokenizer, variant)
    if int(state.step) < steps:
        metrics = MetricsLog(run.path, variant, corpus.names, total_steps=steps, first_step=int(state.step),
                             log_every=config.train.log_every)
        try:
            state, status = train(trainer, state, batches, num_steps=steps, checkpointer=checkpointer,
                                  save_every=config.train.save_every, data_state=batches.get_state,
                                  on_metrics=metrics, log_every=0)  # MetricsLog logs progress with ETA
        finally:
            metrics.close()
        if status == "preempted":
            raise Interrupted(f"[{variant}] stopped at step {int(state.step)} on SIGTERM; checkpoint saved in "
                              f"{checkpointer.directory}; rerun the same command to resume")
    checkpointer.close()
    return state


def _fixed_mask(run: RunDir, config, variant: str, trainer: KoffTrainer, corpus: setup.Corpus, tokenizer):
    """The mask a variant trains under when it does not train its own gates (else None).

    Random and score masks are written to `baselines/<source>_mask.npz` once, so a resumed
    run trains under exactly the same mask.
    """
    source = mask_source(variant)
    cfg, k = trainer.cfg, config.koff
    if source == "gates":
        return None
    if source == "dense":
        return baselines.dense_mask(cfg)
    path = run.path / "baselines" / f"{source}_mask.npz"
    if path.exists():
        return load_npz(path)
    if source == "random":
        mask = baselines.random_mask(cfg, k.target_sparsity, k.sparsity_over, seed=config.data.seed)
    else:
        mask = baselines.masks_from_scores(cfg, _taylor_scores(run, config, trainer, corpus, tokenizer),
                                           k.target_sparsity, k.sparsity_over)
    if run.primary:  # every process computed the same mask (the score mask's batches span all of them)
        save_npz(run.file("baselines", path.name), mask)  # atomic: a resumed run never reads half a mask
    return mask


def _taylor_scores(run: RunDir, config, trainer: KoffTrainer, corpus: setup.Corpus, tokenizer
                   ) -> dict[str, np.ndarray]:
    """The one-shot Taylor scores of every head and neuron (`baselines.taylor_scores`), computed once per run on
    `train.calibration_batches` training batches and kept in `baselines/taylor_scores.npz`: the score mask and
    the importance start of the gates read the same scores."""
    path = run.path / "baselines" / "taylor_scores.npz"
    if path.exists():
        return load_npz(path)
    batches = pipeline.train_batches(corpus.train, tokenizer, seq_len=config.data.seq_len,
                                     batch_size=config.data.batch_size,
                                     seed=config.data.seed + 1)  # training text, not the training order
    with Timer(run, "taylor_scores"):
        scores = baselines.taylor_scores(trainer, itertools.islice(batches, config.train.calibration_batches))
    if run.primary:
        save_npz(run.file("baselines", path.name), scores)
    return scores


def _trainer(run: RunDir, config, variant: str, decoder, mesh, corpus: setup.Corpus, tokenizer) -> KoffTrainer:
    """The trainer of `variant`: under its fixed mask if it has one, its gates at the importance start if asked."""
    kcfg = koff_config(config, len(corpus.names), variant)
    plain = KoffTrainer(decoder, kcfg.replace(gate_init="uniform"), mesh)  # what masks and scores are computed with
    fixed = _fixed_mask(run, config, variant, plain, corpus, tokenizer)
    if fixed is not None:  # no gates to start: koff.gate_init does not apply
        return KoffTrainer(decoder, plain.kcfg, mesh, fixed_mask=fixed)
    if kcfg.gate_init == "importance":
        return KoffTrainer(decoder, kcfg, mesh, unit_scores=_taylor_scores(run, config, plain, corpus, tokenizer))
    return plain


def run(config: ml_collections.ConfigDict, workdir: str | None = None) -> RunDir:
    """Run (or resume) the experiment `config` in `workdir` (default `runs/<name>`).

    With `train.seeds = N > 1`, seeds 1..N-1 are full runs of their own in `seeds/<k>/`
    (data and KOFF seeds shifted by k, no analysis); the report shows mean +- sd across seeds.
    """
    start = time.perf_counter()
    mesh = setup.mesh_for(config)  # setup errors leave the work directory untouched
    primary = jax.process_index() == 0  # the process that holds the run directory's lock
    run = RunDir.check(workdir or default_workdir(config), config, primary=primary)  # before the slow setup
    corpus = setup.load_corpus(config)
    decoder, tokenizer = setup.load_model(config, mesh)
    with setup.open_run(run, config):
        log.info("run directory %s", run.path)
        if primary:
            run.record_time("setup", time.perf_counter() - start)
        _run_phases(run, config, mesh, decoder, tokenizer, corpus)
        _extra_seeds(config, run.path)
        if primary:
            write_report(run)
            log.info("report: %s", run.path / "report.md")
        return run


def _extra_seeds(config: ml_collections.ConfigDict, path) -> None:
    for k in range(1, config.train.seeds):
        log.info("seed %d of %d", k + 1, config.train.seeds)
        run(seed_config(config, k), os.fspath(path / "seeds" / str(k)))


def seed_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
    """`config` for its k-th extra seed: data and KOFF seeds shifted by k, one seed, no analysis."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.seed += k
    config.koff.seed += k
    config.train.seeds = 1
    config.analysis.enabled = False
    return config


def _run_phases(run: RunDir, config, mesh, decoder, tokenizer, corpus: setup.Corpus) -> None:
    names = corpus.names
    trainers, masks, tables, lora_scales = {}, {}, {}, {}
    probe = list(itertools.islice(_held_out_batches(config, corpus, tokenizer), 2))  # sampled vs deterministic mask
    for variant in config.train.variants:
        trainer = _trainer(run, config, variant, decoder, mesh, corpus, tokenizer)
        with Timer(run, f"train_{variant}"):
            state = _train_variant(run, config, trainer, variant, corpus, tokenizer)
        masks[variant] = export_variant(run, variant, trainer, state, names)
        tables[variant] = state.memory
        lora_scales[variant] = trainer.kcfg.lora_scale
        gates = jax.device_get(state.gates)
        gap = None if trainer.fixed_mask is not None else mask_gap(  # no gates to sample under a fixed mask
            Scorer.for_trainer(trainer), gates, masks[variant], state.memory or None, lora_scales[variant], probe,
            seed=config.data.seed)
        save_controller(run, variant, gates, gap)
        trainers[variant] = trainer

    if run.read_result("eval.json") is None:
        with Timer(run, "evaluate"):
            results = _evaluate(config, trainers["koff"], corpus, tokenizer, masks, tables, lora_scales)
        run.write_json("eval.json", results)
    del trainers, tables

    if config.analysis.enabled and run.read_result("analysis.json") is None:
        with Timer(run, "analysis"):
            run.write_json("analysis.json", analyze(config, decoder, tokenizer, masks, corpus))


def _held_out_batches(config, corpus, tokenizer):
    """Held-out evaluation batches, text placed after the memory slots (the scorer does not shift).

    Every process reads all of them (`Scorer` takes the same whole batches on every process).
    """
    for batch in pipeline.eval_batches(corpus.held_out, tokenizer, seq_len=config.data.seq_len,
                                       batch_size=config.eval.batch_size, shard=pipeline.Shard(0, 1)):
        yield after_memory(batch, config.koff.memory_slots)


def _evaluate(config, trainer, corpus, tokenizer, masks, tables, lora_scales) -> dict:
    e, slots = config.eval, config.koff.memory_slots
    rows = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seq_len=e.seq_len, context=e.context,
                batch_size=e.batch_size, first_position=slots)  # text follows the memory slots (trainer.after_memory)
    documents = document_batches([setup.token_ids(s, tokenizer) for s in corpus.documents], **rows)
    paragraphs = document_batches([setup.token_ids(s, tokenizer) for s in corpus.held_out], **rows)
    questions = {}
    if e.mc_questions:
        sizes = dict(num_questions=e.mc_questions, prompt_tokens=e.mc_prompt_tokens,
                     continuation_tokens=e.mc_continuation_tokens, seed=config.data.seed, distractors=e.mc_distractors)
        aligned_ids = [setup.token_ids(source, tokenizer) for source in corpus.held_out_all]
        if "continuation" in e.mc_tasks:  # from whole documents (pages) when the corpus has them
            ids = [setup.token_ids(s, tokenizer) for s in corpus.all_documents]
            questions["continuation"] = multiple_choice.build_questions(
                ids, aligned=corpus.aligned and corpus.all_documents is corpus.held_out_all, **sizes)
        if "translation" in e.mc_tasks and corpus.aligned:
            separator = tokenizer.encode(TRANSLATION_SEPARATOR, add_bos=False)
            page_ids = [str(corpus.held_out_all[0].records[i].get("page_id", i))
                        for i in range(len(corpus.held_out_all[0].records))]
            questions["translation"] = multiple_choice.build_translation_questions(
                aligned_ids, source=0, separator=separator, pages=page_ids, **sizes)
        elif "translation" in e.mc_tasks:
            log.warning("skipping translation questions: corpus %s is not aligned across domains", config.data.corpus)
    settings = settings_lib.resolve(config.train.variants, config.eval.settings)
    return suite.evaluate(Scorer.for_trainer(trainer), settings, domains=corpus.names, documents=documents, paragraphs=paragraphs, masks=masks, tables=tables,
                          lora_scales=lora_scales, questions=questions, mc_settings=e.mc_settings,
                          batch_size=e.batch_size, pad_id=tokenizer.pad_id, first_position=slots)


def analyze(config, decoder, tokenizer, masks: dict[str, dict[str, np.ndarray]],
            corpus: setup.Corpus | None = None) -> dict:
    """LAPE specialisation of the dense model's neurons on held-out text, against every variant's mask.

    Activation statistics read `analysis.tokens` held-out tokens per domain (whole documents,
    evenly spread over the split; all of it if the split is smaller).
    """
    a = config.analysis
    corpus = corpus or setup.load_corpus(config)
    ids = [setup.documents_up_to(source, tokenizer, a.tokens) for source in corpus.all_documents]
    batches = document_batches(ids, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seq_len=config.data.seq_len,
                               batch_size=config.eval.batch_size).batches
    probs, tokens = lape.activation_probabilities(decoder, batches, len(corpus.names))
    return lape.specialisation(probs, masks, corpus.names, fraction=a.specific_fraction,
                               min_activation_quantile=a.min_activation_quantile, permutations=a.permutations,
                               tokens=tokens.tolist())


def analyze_run(workdir: str) -> RunDir:
    """`sparsemem analyze`: (re)compute analysis.json of a finished run and rewrite its report."""
    run = RunDir(workdir)
    config = run.config()
    mesh = setup.mesh_for(config)  # starts jax.distributed if the run did: every process computes, process 0 writes
    with setup.open_run(run, config):  # reads the run once process 0 holds the lock
        masks = {variant: load_mask(run, variant) for variant in config.train.variants}
        decoder, tokenizer = setup.load_model(config, mesh)
        with Timer(run, "analysis"):
            run.write_json("analysis.json", analyze(config, decoder, tokenizer, masks))
            if run.primary:
                write_report(run)
                log.info("report: %s", run.path / "report.md")
    return run

