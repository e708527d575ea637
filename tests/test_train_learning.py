"""On a tiny random model, gates + memories fit a fixed batch; the Lagrangian drives the gates to the target.

The gates train for the first half of the steps, then the top-k mask at the target is frozen
and only the memory trains (KoffConfig.gate_fraction).
"""

import numpy as np
from flax import nnx

from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.train import KoffTrainer

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16,
                                     vocab_size=256, sliding_window=8)
STEPS, TARGET = 300, 0.3
KCFG = KoffConfig(num_domains=2, memory_slots=8, target_sparsity=TARGET, total_steps=STEPS, warmup_fraction=0.25,
                  gate_fraction=0.5, init_keep_prob=0.9, gate_lr=0.1, lambda_lr=0.2, memory_lr=0.01)


def fit(kcfg, domain_tokens=None):
    trainer = KoffTrainer(Decoder(CFG, rngs=nnx.Rngs(0)), kcfg)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, CFG.vocab_size, (4, 17))
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((4, 16)), segment_ids=np.ones((4, 16)),
                 positions=np.tile(np.arange(16), (4, 1)), domain=np.array([0, 1, 0, 1]))
    state = trainer.init(domain_tokens)
    losses, sparsities = [], []
    for _ in range(STEPS):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
        sparsities.append(float(metrics["expected_sparsity"]))
    return losses, sparsities


def test_gates_and_memories_lower_the_loss_at_the_target_sparsity():
    domain_tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8))
    losses, sparsities = fit(KCFG, domain_tokens)
    assert np.mean(losses[-10:]) < losses[0] - 0.8  # from ~5.5 (uniform over 256 tokens)
    gate_phase, memory_phase = sparsities[:KCFG.gate_steps], sparsities[KCFG.gate_steps:]
    assert gate_phase[0] < 0.15 and max(gate_phase) > TARGET - 0.03  # the constraint moved the gates
    np.testing.assert_allclose(memory_phase, TARGET, atol=0.01)  # then the frozen top-k mask is at the target
    # Memories frozen at zero (no KV slots, LoRA B stays 0): same gates training, loss ends higher.
    frozen, _ = fit(KCFG.replace(memory_slots=0, memory_lr=0.0))
    assert np.mean(frozen[-10:]) > np.mean(losses[-10:]) + 0.5
