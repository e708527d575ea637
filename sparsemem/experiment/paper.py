"""The paper-scale KOFF setting shared by the configs for Llama-3.x and Qwen2.5 on a TPU slice.

Hyper-parameters are our choices for a first reproduction, not the paper's exact
values. Meshes are ones `sparsemem compile` showed to lay out and fit (launch/README.md):
`data 4 x fsdp 2 x model 2` on a v5p-32 for 7B/8B, `1 x 1 x 4` on a v5p-8 for 3B.
"""

from __future__ import annotations

from typing import Literal

import ml_collections

from sparsemem.experiment.config import defaults

_LANGUAGES = {"wiki40b": ("en", "de", "ru", "ja"), "libreoffice_help": ("en-US", "de", "ru", "ja")}


def paper_config(name: str, model_dir: str, corpus: Literal["wiki40b", "libreoffice_help"],
                 mesh: tuple[int, int, int]) -> ml_collections.ConfigDict:
    """KOFF at paper scale for the HF model at `models/<model_dir>` on `corpus`, over a `(data, fsdp, model)` mesh."""
    c = defaults()
    c.name = name
    c.model.source = "hf"
    c.model.path = f"models/{model_dir}"
    c.model.param_dtype = "bfloat16"
    c.data.corpus = corpus
    c.data.languages = _LANGUAGES[corpus]
    c.data.seq_len = 1024
    c.data.batch_size = 32
    c.koff.target_sparsity = 0.12
    c.koff.memory_slots = 64
    c.koff.lora_rank = 16
    c.koff.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.koff.kl_weight = 0.5
    c.koff.gate_lr = 0.05
    c.koff.memory_lr = 1e-3
    c.koff.warmup_fraction = 0.2
    c.koff.compute_dtype = "bfloat16"
    c.koff.remat = "full"
    c.koff.loss_chunk = 4096
    c.train.steps = 4000
    c.train.variants = ("koff", "prune_only", "prune_then_memory", "lora_only", "kv_only", "dense_memory",
                        "random_mask", "random_mask_memory", "score_mask", "score_mask_memory")
    c.train.save_every = 250
    c.train.log_every = 25
    c.eval.split = "test"  # the final report; tune with --set eval.split=validation
    c.eval.documents = 2000
    c.eval.paragraphs = 2000
    c.eval.batch_size = 32
    c.eval.mc_questions = 500
    c.eval.mc_settings = ("dense", "pruned", "pruned_retrained", "pruned_lora", "pruned_kv", "prune_then_memory",
                         "koff")
    c.analysis.tokens = 200_000
    c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh
    c.mesh.distributed = True
    return c
