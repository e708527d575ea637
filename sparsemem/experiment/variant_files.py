"""A trained variant's files in its run directory: `export/<variant>/{mask.npz, sparsity.json, memory/<domain>.npz}`.

Written when the variant finishes training (`export_variant`), read by evaluation,
`sparsemem extend` and `sparsemem export` (`load_mask`); `.npz` files are written
atomically and read through epath (local or `gs://`).
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sparsemem.experiment.rundir import RunDir
from sparsemem.files import DamagedFileError, atomic_write
from sparsemem.koff import sparsity
from sparsemem.train.state import TrainState
from sparsemem.train.trainer import KoffTrainer


def export_variant(run: RunDir, variant: str, trainer: KoffTrainer, state: TrainState,
                   domains: list[str]) -> dict[str, np.ndarray]:
    """Write `export/<variant>/{mask.npz, sparsity.json, memory/<domain>.npz}`; returns the 0/1 masks.

    The mask is the one the trainer evaluates with (`KoffTrainer.final_masks`).
    """
    cfg, kcfg = trainer.cfg, trainer.kcfg
    masks = trainer.final_masks(state)
    memory = multihost_utils.process_allgather(state.memory, tiled=True)  # every process takes part
    if not run.primary:
        return masks
    save_npz(run.file("export", variant, "mask.npz"), masks)
    remaining = sparsity.remaining_params(cfg, masks)
    run.write_json(f"export/{variant}/sparsity.json", {
        "target": kcfg.target_sparsity,
        "target_over": kcfg.sparsity_over,
        "prunable": float(sparsity.sparsity(cfg, remaining, "prunable")),
        "all": float(sparsity.sparsity(cfg, remaining, "all")),
        "heads_kept_per_layer": masks["head"].sum(1).astype(int).tolist(),
        "neurons_kept_per_layer": masks["neuron"].sum(1).astype(int).tolist(),
        "num_heads": cfg.num_heads,
        "d_ff": cfg.d_ff,
    })
    save_memory_rows(run, variant, memory, domains)
    return masks


def save_memory_rows(run: RunDir, variant: str, memory: dict[str, np.ndarray], domains: list[str]) -> None:
    """Write row `d` of the memory table as `export/<variant>/memory/<domains[d]>.npz` (nothing without memory)."""
    for d, name in enumerate(domains):
        if memory:
            save_npz(run.file("export", variant, "memory", f"{name}.npz"), {k: v[d] for k, v in memory.items()})


def save_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_npz(path: epath.Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file, read through epath (local or `gs://`)."""
    with path.open("rb") as f, np.load(f) as data:
        return dict(data)


def load_mask(run: RunDir, variant: str) -> dict[str, np.ndarray]:
    path = run.path / "export" / variant / "mask.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run has not finished training variant {variant!r}; "
                                "rerun `sparsemem run` with its config to complete it")
    try:
        return load_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DamagedFileError(path, str(error), "rerun `sparsemem run` with the run's config: it exports the mask "
                                                 "again from the final checkpoint") from None
