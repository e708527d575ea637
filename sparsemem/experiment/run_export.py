"""`sparsemem export`: a trained run directory -> an export folder for serving.

Resolves the pieces `sparsemem.serve.export_folder.export` takes from a run
(`sparsemem run`): the decoder and tokenizer its config names, the variant's
`export/<variant>/mask.npz` and `memory/<domain>.npz` (the run's domains and those
added by `sparsemem extend`), each domain's training documents for its routing
centroid and, for width rounding, the gate scores of the variant's latest checkpoint.
Serving itself knows nothing of run directories.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np
from flax import nnx

from sparsemem.checkpoints.run_state import RunCheckpointer
from sparsemem.experiment import setup
from sparsemem.experiment.domains import all_sources, routing_documents
from sparsemem.experiment.rundir import RunDir
from sparsemem.experiment.variant_files import load_mask, load_npz
from sparsemem.koff import gates, sparsity
from sparsemem.koff.config import lora_scale
from sparsemem.models.config import ModelConfig
from sparsemem.serve.export_folder import export

log = logging.getLogger(__name__)


def gate_scores(checkpoint_dir, cfg: ModelConfig, block_gates: bool) -> dict[str, np.ndarray]:
    """Keep probabilities of every head and neuron from the latest run checkpoint (block gates folded in).

    The checkpoint's gates must have this model's layout (`RunCheckpointer.restore_part`).
    """
    like = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: gates.Gates(cfg, block_gates=block_gates, key=jax.random.key(0)))))
    checkpointer = RunCheckpointer(checkpoint_dir)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: rounding widths needs the "
                                    "trained gates")
        log_alphas = checkpointer.restore_part("gates", like)
    finally:
        checkpointer.close()
    head, neuron = gates.scales(sparsity.keep_probs({k: np.asarray(v) for k, v in log_alphas.items()}))
    return {"head": np.asarray(head), "neuron": np.asarray(neuron)}


def memory_table(run: RunDir, variant: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """`(domains, table [D, ...])` from `export/<variant>/memory/<domain>.npz` (empty for a memory-free variant)."""
    files = sorted((run.path / "export" / variant / "memory").glob("*.npz"))
    rows = [load_npz(path) for path in files]
    return [path.stem for path in files], ({k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {})


def export_run(run_dir: str | pathlib.Path, variant: str = "koff", out: str | pathlib.Path | None = None, *,
               round_to: int | None = None, merge_domain: str | None = None,
               routing_layer: int | None = None) -> pathlib.Path:
    """Export `variant` of a `sparsemem run` directory (default output: `<run>/export/<variant>/serve`).

    Every module gets the routing centroid of its domain's training text (the run's
    domains and those added by `sparsemem extend`).
    """
    run = RunDir(run_dir)
    config = run.config()
    masks = load_mask(run, variant)
    domains, table = memory_table(run, variant)
    decoder, tokenizer = setup.load_model(config, None)
    sources = {s.name: s for s in all_sources(run, config, "train")}
    texts = {name: routing_documents(sources[name], tokenizer, config.data.seq_len) for name in domains
             if name in sources}
    if len(texts) < len(domains):
        log.warning("no training text for domain(s) %s in the run's corpus: exporting without routing centroids "
                    "(--domain auto will be unavailable)", sorted(set(domains) - set(texts)))
        texts = None
    scores = (gate_scores(run.path / "checkpoints" / variant, decoder.cfg, config.koff.block_gates) if round_to
              else None)
    tokenizer_file = setup.model_folder(config) / "tokenizer.json"
    return export(decoder, masks, table, domains, lora_scale(config.koff.lora_alpha, config.koff.lora_rank),
                  out or run.path / "export" / variant / "serve", scores=scores, round_to=round_to,
                  merge_domain=merge_domain, tokenizer_file=tokenizer_file if tokenizer_file.exists() else None,
                  routing_texts=texts, routing_layer=routing_layer)
