"""On a tiny random model, gates + memories train jointly: the loss falls, the expected sparsity stays on target,
and the learned mask removes planted useless and harmful neurons."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.loss import token_cross_entropy
from sparsemem.train import KoffTrainer

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16,
                                     vocab_size=256, sliding_window=8)
STEPS, TARGET = 300, 0.3
KCFG = KoffConfig(num_domains=2, memory_slots=8, target_sparsity=TARGET, total_steps=STEPS, warmup_fraction=0.25,
                  init_keep_prob=0.9, gate_lr=0.1, memory_lr=0.01)


def batch_of(tokens):
    b, t = tokens.shape
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((b, t - 1)),
                segment_ids=np.ones((b, t - 1)), positions=np.tile(np.arange(t - 1), (b, 1)),
                domain=np.arange(b) % 2)


def fit(kcfg, domain_tokens=None, decoder=None, batch=None):
    trainer = KoffTrainer(decoder or Decoder(CFG, rngs=nnx.Rngs(0)), kcfg)
    batch = batch or batch_of(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 17)))
    state = trainer.init(domain_tokens)
    history = []
    for _ in range(kcfg.total_steps):
        state, metrics = trainer.train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    return history, trainer, state


def test_joint_training_lowers_the_loss_on_target_and_polarises():
    domain_tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8))
    history, trainer, state = fit(KCFG, domain_tokens)
    losses = [h["loss"] for h in history]
    sparsities = np.array([h["expected_sparsity"] for h in history])
    assert np.mean(losses[-10:]) < losses[0] - 0.8  # from ~5.5 (uniform over 256 tokens)
    assert sparsities[0] < 0.15 and sparsities[150:].min() >= 0.28 and sparsities[150:].max() <= 0.32
    assert history[-1]["polarised"] >= 0.9
    # The mask training saw is the mask evaluated: sampled-gate and deterministic losses agree at the end.
    deterministic = np.nanmean(trainer.evaluate(state, [batch_of(np.random.default_rng(0).integers(
        0, CFG.vocab_size, (4, 17)))])["loss_memory"])
    assert abs(np.mean(losses[-10:]) - deterministic) < 0.1
    # Memories frozen at zero (no KV slots, LoRA B stays 0): same gates training, loss ends higher.
    frozen, _, _ = fit(KCFG.replace(memory_slots=0, memory_lr=0.0))
    assert np.mean([h["loss"] for h in frozen[-10:]]) > np.mean(losses[-10:]) + 0.5


def planted_decoder(seed=0, fit_steps=200):
    """A decoder fitted to a batch with its neurons 0..31 of each layer silenced, then neurons 0..15 left useless
    (zero output) and 16..31 made harmful (large random output): every other neuron was trained to help."""
    decoder = Decoder(CFG, rngs=nnx.Rngs(seed))
    batch = batch_of(np.random.default_rng(seed + 1).integers(0, CFG.vocab_size, (8, 33)))
    silenced = jnp.ones((CFG.num_layers, CFG.d_ff, 1)).at[:, :32].set(0.0)
    decoder.layers.w_down[...] = decoder.layers.w_down[...] * silenced
    tx = optax.adam(1e-2)
    params = nnx.state(decoder, nnx.Param)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(params):
            model = nnx.merge(nnx.graphdef(decoder), params)
            hidden, _ = model(jnp.asarray(batch["inputs"]))
            return jnp.mean(token_cross_entropy(model, hidden, jnp.asarray(batch["targets"])))

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt)
        params = optax.apply_updates(params, updates)
        params["layers"]["w_down"][...] = params["layers"]["w_down"][...] * silenced
        return params, opt

    for _ in range(fit_steps):
        params, opt = step(params, opt)
    nnx.update(decoder, params)
    noise = jax.random.normal(jax.random.key(seed), (CFG.num_layers, 16, CFG.d_model))
    decoder.layers.w_down[...] = decoder.layers.w_down[...].at[:, 16:32].set(noise)
    return decoder, batch


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_ranking_removes_planted_useless_and_harmful_neurons(seed):
    decoder, batch = planted_decoder(seed)
    kcfg = KoffConfig(num_domains=2, memory_slots=0, lora_rank=0, lora_targets=(), target_sparsity=0.25,
                      total_steps=150, warmup_fraction=0.3, gate_lr=0.1, seed=seed)
    history, _, state = fit(kcfg, decoder=decoder, batch=batch)
    planted = np.zeros((CFG.num_layers, CFG.d_ff), bool)
    planted[:, :32] = True
    # The learned top-k over neurons: the 25 % lowest log_alpha, as many as are planted.
    lowest = np.argsort(np.asarray(state.gates["neuron"]).ravel(), stable=True)[: planted.sum()]
    assert planted.ravel()[lowest].mean() >= 0.9, history[-1]
