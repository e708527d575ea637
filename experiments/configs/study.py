"""The learned-mask study (issue #29): does a mask learned jointly with the memories beat a one-shot score mask?

sparsemem study --config experiments/configs/study.py     # resumable; `--report-only` re-renders study.md

The demo's model, corpus, sparsity (12%), memories and learning rates, every variant trained for
the same optimiser steps on the same tokens, at two budgets (20 and 80 steps) x 3 seeds, evaluated
on 8 test pages per domain (the demo's); the report reads every seed and corrects for the whole family of claims.
Methods: KOFF from the importance start (`koff`) and from the uniform start (`koff_uniform`),
prune-then-memory (half the steps prune without memories, half train them), the mask learned
without memories (`prune_only`), the Taylor-score mask with and without memories.
Gate recipe: the demo's (experiments/configs/demo.py, docs/experiments.md "Gate levers"): the mask
freezes after half the steps (`koff.gate_fraction` 0.5, the memories train the other half under it:
the lever that won the validation screen of `experiments/gate_levers.sh`); the target ramps over half
the gate steps (Sheared-LLaMA ramps over a fifth of far more steps; a 4-step ramp decided the ranking
in a dozen noisy steps), every example of a batch draws its own gate sample (4 samples per step, no
extra matmul work), no distillation term (it costs a dense forward per step). Variants without
memories train their gates every step (nothing would train under a frozen mask).
Budget on the 2-core CPU: 5 trained variants x (20 + 80) steps x 3 seeds = 1,500 steps at ~4.5 s
(quiet) = 1.9 h, plus 8 settings x 8 pages x 4 domains of evaluation per cell (6 cells). Measured under
a load of ~15 (four other jobs): ~13 s per step and ~6 min per setting at 16 pages, which is why the
study reads 8. The evaluation keys are pinned here, not inherited from the demo, so a finished cell
stays valid when the demo's evaluation changes.
"""

import os

from sparsemem.experiment.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(__file__), "demo.py"))
    c.name = "study"
    c.train.variants = ("koff", "koff_uniform", "prune_only", "prune_then_memory", "score_mask", "score_mask_memory")
    c.train.seeds = 3
    c.train.save_every = 20
    c.study.budgets = (20, 80)
    c.eval.documents = 8
    c.eval.paragraphs = 4
    c.eval.seq_len = 1024
    c.eval.context = 256
    c.eval.batch_size = 4
    c.eval.resamples = 2000
    c.eval.mc_questions = 0
    c.eval.settings = ("dense", "pruned", "pruned_retrained", "prune_then_memory", "koff", "koff_uniform",
                       "score_mask", "score_mask_memory")
    c.analysis.enabled = False
    return c
