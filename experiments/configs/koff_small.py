"""A longer KOFF run on Gemma-3-270M for a GPU (or a long CPU job); sweep with experiments/koff_small_sweep.sh.

sparsemem run --config experiments/configs/koff_small.py --set koff.target_sparsity=0.06 --workdir runs/koff_small_06

600 steps of 8 x 256 tokens per variant: about 20x the demo's compute (~9 h on 2 CPU cores).

All five variants are trained (KOFF, pruning without memories, memories trained after
pruning on its frozen mask, LoRA only, KV only), so every ablation in the report is a
separately trained model at the same sparsity.
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
    c.koff.gate_lr = 0.1
    c.koff.memory_lr = 1e-3
    c.train.steps = 600
    c.train.variants = ("koff", "prune_only", "prune_then_memory", "lora_only", "kv_only")
    c.train.save_every = 50
    c.train.log_every = 10
    c.eval.paragraphs = 256
    c.eval.batch_size = 8
    c.eval.mc_questions = 64
    c.eval.mc_settings = ("dense", "pruned", "pruned_retrained", "pruned_lora", "pruned_kv", "prune_then_memory",
                         "koff")
    c.analysis.paragraphs = 128
    return c
