"""Build what a run needs from its config: mesh, decoder, tokenizer, train/held-out domains, its directory opened
in every process."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import ContextManager

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparsemem import files
from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer, read_config
from sparsemem.data import pages as pages_lib, pipeline, sources as sources_lib
from sparsemem.data.sources import DomainSource, SubsetRecords
from sparsemem.experiment.rundir import RunDir
from sparsemem.models.decoder import Decoder
from sparsemem.parallel import multihost
from sparsemem.parallel.mesh import make_mesh
from sparsemem.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STAGED_MODELS = "~/.cache/sparsemem/staged"  # where a `gs://` model.path is copied on each host


# Read here for processes jax cannot detect (see `start_distributed`); jax reads JAX_COORDINATOR_ADDRESS itself.
PROCESS_ENV = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def start_distributed() -> None:
    """`jax.distributed.initialize()` once per process (a run's seed sub-runs ask again).

    On a Cloud TPU slice (also Slurm, Open MPI, Kubernetes) jax detects the coordinator, the
    process count and this process's id. Elsewhere (processes on one machine, plain VMs) set
    `JAX_COORDINATOR_ADDRESS=host:port` (read by jax), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
    (read here) in every process's environment.
    """
    if jax.distributed.is_initialized():
        return
    given = {name: os.environ[name] for name in PROCESS_ENV if os.environ.get(name)}
    if not given:
        jax.distributed.initialize()
        return
    if len(given) != len(PROCESS_ENV) or not all(v.isdigit() for v in given.values()):
        raise ValueError(f"mesh.distributed: got {given}; set both {' and '.join(PROCESS_ENV)} to integers "
                         "(with JAX_COORDINATOR_ADDRESS=host:port), or neither on a slice jax detects itself")
    jax.distributed.initialize(num_processes=int(given["JAX_NUM_PROCESSES"]),
                               process_id=int(given["JAX_PROCESS_ID"]))


def mesh_for(config: ml_collections.ConfigDict):
    """The run's mesh over the first data x fsdp x model devices (after jax.distributed starts, if asked)."""
    m = config.mesh
    if m.distributed:
        start_distributed()
    n = m.data * m.fsdp * m.model
    if n > len(jax.devices()):
        raise ValueError(f"mesh {m.data}x{m.fsdp}x{m.model} (data x fsdp x model) needs {n} devices but "
                         f"{len(jax.devices())} are visible; change mesh.*")
    return make_mesh({"data": m.data, "fsdp": m.fsdp, "model": m.model}, devices=jax.devices()[:n])


def open_run(run: RunDir, config: ml_collections.ConfigDict) -> ContextManager[RunDir]:
    """`run.open(config)` in every process (after `jax.distributed` started, if the config asks): process 0 holds
    the lock and writes, the others wait at a barrier until it has opened the folder, then write nothing."""
    return run.open(config, primary=jax.process_index() == 0, barrier=multihost.barrier("sparsemem run directory"))


def model_folder(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The local folder of the config's model (`model.source="hf"`), else of the embedded demo model.

    A `gs://` `model.path` is copied to this host's disk once. Random models use the demo
    model's tokenizer (and its config, resized).
    """
    if config.model.source == "hf":
        return files.local_copy(config.model.path, STAGED_MODELS)
    from sparsemem.checkpoints.gguf import demo_model_dir  # noqa: PLC0415 (needs the demo extra)
    return demo_model_dir()


def load_model(config: ml_collections.ConfigDict, mesh) -> tuple[Decoder, Tokenizer]:
    """The frozen decoder (on `mesh`) and its tokenizer."""
    m = config.model
    dtype = jnp.dtype(m.param_dtype)
    folder = model_folder(config)
    tokenizer = load_tokenizer(folder, read_config(folder))
    if m.source != "random":
        log.info("loading %s", folder)
        return load_hf_checkpoint(folder, mesh=mesh, param_dtype=dtype), tokenizer
    cfg = read_config(folder)
    dims = {k: v for k, v in m.random.to_dict().items() if k != "seed"}
    cfg = cfg.replace(**dims)
    log.info("random decoder %s (tokenizer of %s)", dims, folder)
    return Decoder(cfg, rngs=nnx.Rngs(m.random.seed), param_dtype=dtype), tokenizer


@dataclasses.dataclass
class Corpus:
    names: list[str]
    train: list[DomainSource]  # documents of `data.unit` (whole pages by default)
    documents: list[DomainSource]  # held-out documents of `data.unit` for perplexity (capped, evenly spread)
    held_out: list[DomainSource]  # held-out paragraphs (capped, evenly spread): the memory-swap matrix
    held_out_all: list[DomainSource]  # the whole held-out paragraph split (multiple-choice questions)
    aligned: bool  # held_out[i].records[j] translates held_out[k].records[j]
    all_documents: list[DomainSource]  # the whole held-out split of `data.unit` documents (MC, activation statistics)


def spread(source: DomainSource, count: int) -> DomainSource:
    """`count` records of `source`, evenly spread over it (all if it has fewer)."""
    n = len(source.records)
    if n == 0:
        raise ValueError(f"domain {source.name!r} has no held-out documents")
    indices = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int)).tolist()
    return DomainSource(source.name, SubsetRecords(source.records, indices), source.text_key, source.clean)


def load_corpus(config: ml_collections.ConfigDict) -> Corpus:
    """Train domains, held-out documents (`eval.documents`) and paragraphs (`eval.paragraphs`) per domain.

    The held-out split is `eval.split`. For the help corpus, `data.unit="page"` makes training
    and perplexity read whole pages; the paragraph-aligned view serves the swap matrix and
    multiple choice. Other corpora are documents already.
    """
    d, e = config.data, config.eval
    data_dir = d.data_dir or None
    pages = None
    if d.corpus == "libreoffice_help":
        train = sources_lib.libreoffice_sources(list(d.languages), "train", data_dir=data_dir)
        held = sources_lib.libreoffice_sources(list(d.languages), e.split, aligned=True, data_dir=data_dir)
        if d.unit == "page":
            train = [pages_lib.page_source(s) for s in train]
            pages = [pages_lib.page_source(s) for s in
                     sources_lib.libreoffice_sources(list(d.languages), e.split, data_dir=data_dir)]
        documents = pages or held
        aligned = True
    elif d.corpus == "wiki40b":
        train, held = ([sources_lib.catalog_source(f"wiki40b/{lang}", split, domain=lang, data_dir=data_dir)
                        for lang in d.languages] for split in ("train", e.split))
        documents, aligned = held, False
    else:
        train = sources_lib.text_folder_sources(d.folder, "train", data_dir=data_dir)
        held = sources_lib.text_folder_sources(d.folder, e.split, data_dir=data_dir)
        documents, aligned = held, False
    return Corpus([s.name for s in train], train, [spread(s, e.documents) for s in documents],
                  [spread(s, e.paragraphs) for s in held], held, aligned, documents)


def token_ids(source: DomainSource, tokenizer: Tokenizer) -> list[list[int]]:
    """Every record of `source` tokenised with BOS."""
    texts = [source.text(source.records[i]) for i in range(len(source.records))]
    return tokenizer.encode_batch(texts, add_bos=True)


def documents_up_to(source: DomainSource, tokenizer: Tokenizer, tokens: int) -> list[list[int]]:
    """Whole documents of `source` (with BOS), evenly spread over it, until they hold >= `tokens` tokens (or all)."""
    n = len(source.records)
    order = np.argsort(np.arange(n) * 0.6180339887 % 1.0, kind="stable")  # golden-ratio order: spread at any prefix
    out, total = [], 0
    for i in order:
        if total >= tokens:
            break
        ids = tokenizer.encode(source.text(source.records[int(i)]), add_bos=True)
        out.append(ids)
        total += len(ids)
    return out


def prefill_tokens(train: list[DomainSource], tokenizer: Tokenizer, slots: int) -> np.ndarray:
    """`[D, slots]`: the first `slots` tokens of each domain's training text (paragraphs joined with EOS)."""
    rows = []
    for source in train:
        ids: list[int] = []
        for i in range(len(source.records)):
            ids += tokenizer.encode(source.text(source.records[i]), add_bos=not ids) + [tokenizer.eos_id]
            if len(ids) >= slots:
                break
        if len(ids) < slots:
            raise ValueError(f"domain {source.name!r} has only {len(ids)} training tokens; "
                             f"koff.memory_slots={slots} needs more (or set koff.memory_init='random')")
        rows.append(ids[:slots])
    return np.asarray(rows, np.int32)


def train_batches(config: ml_collections.ConfigDict, sources: list[DomainSource], tokenizer: Tokenizer,
                  shard: pipeline.Shard | None = None):
    """The run's resumable training batches over `sources` (domain ids = positions); `shard`: this process's."""
    return pipeline.train_batches(sources, tokenizer, seq_len=config.data.seq_len,
                                  batch_size=config.data.batch_size, seed=config.data.seed, shard=shard)


def fresh_state(trainer, sources: list[DomainSource], tokenizer: Tokenizer):
    """`trainer.init()`, with KV memory prefilled from each source's first tokens when the config asks for it."""
    kcfg = trainer.kcfg
    prefill = kcfg.memory_init == "prefill" and kcfg.memory_slots > 0
    return trainer.init(prefill_tokens(sources, tokenizer, kcfg.memory_slots) if prefill else None)


def resume_or_start(checkpointer, trainer, batches, sources: list[DomainSource],
                    tokenizer: Tokenizer, label: str):
    """`(state, resumed)`: the newest readable checkpoint (moving `batches` to its data position), else a fresh state."""
    restored = checkpointer.restore_newest_readable(trainer.abstract_state)
    if restored is None:
        return fresh_state(trainer, sources, tokenizer), False
    state, data_state = restored
    batches.set_state(data_state)
    log.info("[%s] resuming from step %d", label, int(state.step))
    return state, True

