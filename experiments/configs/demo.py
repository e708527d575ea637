"""The README's demo: KOFF on the embedded Gemma-3-270M with four help-corpus languages, on 2 CPU cores.

sparsemem run --config experiments/configs/demo.py
"""

from sparsemem.experiment.config import defaults


def get_config():
    c = defaults()
    c.name = "demo"
    c.model.source = "demo"
    c.data.languages = ("en-US", "de", "ja", "ru")  # Latin/Germanic, Latin/Germanic, Japanese, Cyrillic/Slavic
    c.data.seq_len = 128
    c.data.batch_size = 4
    c.koff.target_sparsity = 0.12
    c.koff.memory_slots = 16
    c.koff.lora_rank = 8
    c.koff.lora_targets = ("q", "v", "o", "down")
    # 40 steps of joint training (gates, KV memory and LoRA together): the target ramps up over the
    # first 8, the gates polarise over the last 8 (docs/experiments.md, "Gate dynamics").
    c.koff.warmup_fraction = 0.2
    c.koff.polarise_fraction = 0.2
    c.koff.gate_lr = 0.3
    c.koff.memory_lr = 1e-3  # 5e-3 made the train loss worse than no memory (docs/experiments.md)
    c.train.steps = 40
    c.train.variants = ("koff", "prune_only", "prune_then_memory", "lora_only", "kv_only")
    c.train.save_every = 10
    c.train.log_every = 4
    c.eval.paragraphs = 16
    c.eval.batch_size = 4
    c.eval.mc_questions = 8
    c.eval.mc_settings = ("dense", "pruned_retrained", "koff")
    c.analysis.paragraphs = 8
    c.analysis.permutations = 1000
    return c
