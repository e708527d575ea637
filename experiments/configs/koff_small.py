"""A longer KOFF run on Gemma-3-270M for a GPU (or a long CPU job); sweep with experiments/koff_small_sweep.sh.

sparsemem run --config experiments/configs/koff_small.py --set koff.target_sparsity=0.06 --workdir runs/koff_small_06

600 steps of 8 x 256 tokens per variant, 3 seeds: sized for a GPU (~100x the demo's compute).

Every variant and baseline is trained (KOFF, pruning without memories, memories trained after pruning on its frozen mask, LoRA only, KV only,
memories on the dense model, random and Taylor-score masks with and without memories), so
every comparison in the report is between separately trained models at the same sparsity.
Power: every test page (~100 per language, 14-31k tokens) for perplexity; one continuation
question per test page (~400) and 256 translation questions per target language (768): a
10-point accuracy difference is >= 3.5 standard errors of a paired difference; LAPE over
50k tokens per language, i.e. all the test split has.
"""

from sparsemem.experiment.config import defaults


def get_config():
    c = defaults()
    c.name = "koff_small"
    c.model.source = "demo"
    c.data.languages = ("en-US", "de", "ja", "ru")
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.koff.target_sparsity = 0.12
    c.koff.memory_slots = 32
    c.koff.lora_rank = 8
    c.koff.lora_targets = ("q", "v", "o", "down")
    c.koff.warmup_fraction = 0.2
    # Not tuned at this budget. Tune on validation first (docs/experiments.md, "Learning rates": at the
    # demo's 20 steps, 1e-4 beat 1e-3 for the memories and memory training hardly beat the prefill).
    c.koff.gate_lr = 0.1
    c.koff.memory_lr = 1e-3
    c.train.steps = 600
    c.train.variants = ("koff", "prune_only", "prune_then_memory", "lora_only", "kv_only", "dense_memory", "random_mask",
                        "random_mask_memory", "score_mask", "score_mask_memory")
    c.train.seeds = 3
    c.train.calibration_batches = 32
    c.train.save_every = 50
    c.train.log_every = 10
    c.eval.split = "test"  # the final report; tune with --set eval.split=validation
    c.eval.documents = 512
    c.eval.paragraphs = 256
    c.eval.batch_size = 8
    c.eval.mc_questions = 256
    c.eval.mc_settings = ("dense", "pruned", "pruned_retrained", "pruned_lora", "pruned_kv", "prune_then_memory",
                         "koff")
    c.analysis.tokens = 50_000
    return c
