"""End-to-end CI run: a random 2-layer decoder with the demo tokenizer on the help corpus; ~1-2 min on CPU.

Exercises every phase (every variant and baseline, two seeds, evaluation, swap matrix, multiple
choice, analysis, export, report); its numbers mean nothing.
"""

from sparsemem.experiment.config import defaults


def get_config():
    c = defaults()
    c.name = "ci"
    c.model.source = "random"
    c.model.random = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, seed=0)
    c.data.languages = ("en-US", "de")
    c.data.seq_len = 64
    c.data.batch_size = 4
    c.koff.target_sparsity = 0.25
    c.koff.memory_slots = 4
    c.koff.lora_rank = 2
    c.koff.lora_targets = ("q", "down")
    c.koff.loss_chunk = 256
    c.train.steps = 4
    c.train.variants = ("koff", "koff_importance", "prune_only", "prune_then_memory", "lora_only", "kv_only",
                        "dense_memory", "random_mask", "random_mask_memory", "score_mask", "score_mask_memory")
    c.train.seeds = 2  # exercises the seed sub-runs and mean +- sd
    c.train.calibration_batches = 2
    c.train.save_every = 2
    c.train.log_every = 2
    c.eval.documents = 4
    c.eval.paragraphs = 8
    c.eval.resamples = 200
    c.eval.batch_size = 4
    c.eval.seq_len = 256  # short rows: the tiny model's 262k-vocabulary head costs per row position
    c.eval.context = 64
    c.eval.mc_questions = 2
    c.eval.mc_prompt_tokens = 8
    c.eval.mc_continuation_tokens = 4
    c.analysis.tokens = 1000
    c.analysis.permutations = 50
    return c
