"""Paper-scale KOFF: Llama-3.1-8B (Hugging Face folder at model.path) on the LibreOffice help corpus (`sparsemem data prepare --languages en-US,de,ru,ja`).

A TPU slice of 16 chips (data 2 x fsdp 2 x model 4); on a multi-host slice run the
same command on every host (mesh.distributed=True calls jax.distributed.initialize()):

sparsemem run --config experiments/configs/llama3_1_8b_libreoffice.py --set model.path=/path/to/Llama-3.1-8B --workdir gs://.../llama3_1_8b_libreoffice

Hyper-parameters are our choices for a first reproduction, not the paper's exact values.
"""

from sparsemem.experiment.config import defaults


def get_config():
    c = defaults()
    c.name = "llama3_1_8b_libreoffice"
    c.model.source = "hf"
    c.model.path = "models/Llama-3.1-8B"
    c.model.param_dtype = "bfloat16"
    c.data.corpus = "libreoffice_help"
    c.data.languages = ("en-US", "de", "ru", "ja")
    c.data.seq_len = 1024
    c.data.batch_size = 32
    c.koff.target_sparsity = 0.12
    c.koff.memory_slots = 64
    c.koff.lora_rank = 16
    c.koff.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.koff.kl_weight = 0.5
    c.koff.gate_lr = 0.05
    c.koff.memory_lr = 1e-3
    c.koff.lambda_lr = 0.05
    c.koff.compute_dtype = "bfloat16"
    c.koff.remat = "full"
    c.koff.loss_chunk = 4096
    c.train.steps = 4000
    c.train.variants = ("koff", "prune_only", "lora_only", "kv_only")
    c.train.save_every = 250
    c.train.log_every = 25
    c.eval.paragraphs = 2000
    c.eval.batch_size = 32
    c.eval.mc_questions = 500
    c.eval.mc_settings = ("dense", "pruned", "pruned_retrained", "pruned_lora", "pruned_kv", "koff")
    c.analysis.paragraphs = 1000
    c.mesh.data = 2
    c.mesh.fsdp = 2
    c.mesh.model = 4
    c.mesh.distributed = True
    return c
