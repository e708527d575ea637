"""`KoffTrainer`: jitted, sharded init / train / eval steps for one decoder, config and mesh.

One step (`train_step`):
1. find the distinct domains of the batch and gather their memory rows, moments
   and step counts (`[K, ...]`, K = min(B, D));
2. sample the gates once per step (the same sample for every micro-batch, so
   accumulation equals one large batch), run the decoder over `accum_steps`
   micro-batches with gates + each example's own memory, and accumulate the
   gradients of the summed token losses w.r.t. gate logits and gathered rows;
3. step the gates (Adam) and keep their expected sparsity on the schedule
   (`kcfg.controller`: by default a projection after the step, `koff/controller.py`;
   or the Lagrangian's gradients plus multiplier ascent), step the gathered rows
   (row-sparse Adam) and scatter them back.
Batches carry text positions from 0; the steps move them past the memory slots
(`after_memory`), so the text follows the memory as it would a real prefix.
After `kcfg.gate_steps` the step is the *memory step*: the deterministic mask at the
target replaces the gate sample, and gates and multipliers stay fixed. A trainer given a
`fixed_mask` takes only memory steps, under that mask (baselines whose mask comes from
elsewhere: a random or a score-based one, or all ones). With `kcfg.joint` False the gate
steps run without memories (prune, then train the memories under the frozen mask). With
`kcfg.gate_init = "importance"` the gates start ordered by `unit_scores`
(`koff/importance.py`); `gate_samples > 1` gives each example one of that many gate samples.
The backbone (`train.sharded_backbone.ShardedBackbone`: weights, mesh, rules, batch
placement) is an argument of the step, never donated, never differentiated.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from sparsemem.koff import gates as gates_lib
from sparsemem.koff import controller, rowsparse, sparsity
from sparsemem.koff.config import KoffConfig
from sparsemem.koff.importance import importance_log_alphas
from sparsemem.koff.memory import distinct_rows, gather_rows, hooks_from_rows, prefill_kv, scatter_rows
from sparsemem.koff.module import Koff, split
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import Hooks
from sparsemem.models.loss import token_cross_entropy, token_kl
from sparsemem.parallel import multihost
from sparsemem.parallel.mesh import state_shardings
from sparsemem.train.sharded_backbone import TOKEN_KEYS, ShardedBackbone
from sparsemem.train.state import TrainState


def after_memory(batch: dict[str, jax.Array], slots: int) -> dict[str, jax.Array]:
    """`batch` with text positions moved past the `slots` memory slots.

    Prefill-initialised memory keys carry positions 0..slots-1 (the frozen model's
    own cache over domain text); text placed after them, as after a real prefix,
    never sees a memory key from its future. RoPE is relative, so without memory
    the shift changes nothing.
    """
    return {**batch, "positions": batch["positions"] + slots}


def _child(state: nnx.State) -> dict:
    """The pure dict of the one submodule a filtered `Koff` state holds."""
    values = list(nnx.to_pure_dict(state).values())
    return values[0] if values else {}  # a memory-free run (memory_slots=0, lora_rank=0) has no memory module


def checked_mask(cfg, mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`mask` as float32 0/1 arrays `head [L, H]`, `neuron [L, F]`; a clear error for anything else."""
    expected = {"head": (cfg.num_layers, cfg.num_heads), "neuron": (cfg.num_layers, cfg.d_ff)}
    if set(mask) != set(expected):
        raise ValueError(f"fixed_mask has arrays {sorted(mask)}; expected exactly {sorted(expected)} "
                         "(0/1 masks of query heads [L, H] and MLP neurons [L, F])")
    out = {}
    for name, shape in expected.items():
        value = np.asarray(mask[name], np.float32)
        if value.shape != shape:
            raise ValueError(f"fixed_mask[{name!r}] has shape {value.shape}; this model needs {shape}")
        if not np.all((value == 0) | (value == 1)):
            raise ValueError(f"fixed_mask[{name!r}] must hold only 0 and 1 (a deterministic mask)")
        out[name] = value
    return out


class KoffTrainer:
    """The jitted KOFF steps over a frozen `ShardedBackbone` (`self.backbone`) and a `TrainState`.

    An abstract decoder (`nnx.eval_shape`) gives a compile-only trainer (`compilable_step`).
    """

    def __init__(self, decoder: Decoder, kcfg: KoffConfig, mesh: Mesh | None = None, rules=None,
                 fixed_mask: Mapping[str, np.ndarray] | None = None,
                 unit_scores: Mapping[str, np.ndarray] | None = None):
        """`unit_scores` (`{"head": [L, H], "neuron": [L, F]}`, e.g. `baselines.taylor_scores`) order the
        importance start (`kcfg.gate_init = "importance"`); without them such a trainer compiles its steps
        (`sparsemem compile`) but `init` refuses to start its gates."""
        if unit_scores is not None and kcfg.gate_init != "importance":
            raise ValueError(f"gate_init={kcfg.gate_init!r} takes no unit_scores; set gate_init='importance' to "
                             "start the gates from them")
        self.cfg = decoder.cfg
        self.kcfg = kcfg
        self.backbone = ShardedBackbone(decoder, mesh, rules, dtype=kcfg.compute_dtype, remat=kcfg.remat)
        with self.backbone.context():
            koff_abstract = nnx.eval_shape(lambda: Koff(self.cfg, kcfg, rngs=nnx.Rngs(0)))
            _, groups = split(koff_abstract)
            memory_sh = _child(state_shardings(groups["memory"], self.backbone.mesh))
        adam = controller.array_adam if kcfg.controller == "projection" else optax.adam
        self.gate_tx = adam(kcfg.gate_lr, b1=kcfg.adam_b1, b2=kcfg.adam_b2, eps=kcfg.adam_eps)
        self.lambda_tx = optax.sgd(kcfg.lambda_lr)  # fed negated gradients: ascent
        self.start_log_alphas = None if unit_scores is None else importance_log_alphas(self.cfg, kcfg, unit_scores)
        self.start_sparsity = (  # where the target ramp starts
            controller.initial_sparsity(self.cfg, kcfg) if self.start_log_alphas is None else
            float(sparsity.expected_sparsity(self.cfg, self.start_log_alphas, kcfg.sparsity_over)))

        rep = self.backbone.replicated
        abstract = jax.eval_shape(self._fresh_state)
        self.state_shardings = jax.tree.map(lambda _: rep, abstract).replace(
            memory=memory_sh, memory_opt=rowsparse.RowAdamState(memory_sh, memory_sh, rep))
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_shardings)
        self._init = jax.jit(self._fresh_state, out_shardings=self.state_shardings)
        self._compiled: dict[str, Any] = {}
        self.fixed_mask = None if fixed_mask is None else jax.device_put(
            checked_mask(self.cfg, fixed_mask), rep)

    # -- state ------------------------------------------------------------
    def _fresh_state(self) -> TrainState:
        groups = split(Koff(self.cfg, self.kcfg, rngs=nnx.Rngs(self.kcfg.seed)))[1]
        gates, memory, multipliers = (_child(groups[g]) for g in ("gates", "memory", "multipliers"))
        return TrainState(
            step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(self.kcfg.seed)),
            gates=gates, memory=memory, multipliers=multipliers, gate_opt=self.gate_tx.init(gates),
            lambda_opt=self.lambda_tx.init(multipliers),
            memory_opt=rowsparse.init(memory, self.kcfg.num_domains))

    def init(self, domain_tokens: np.ndarray | None = None) -> TrainState:
        """A fresh state on the mesh; KV memory from the frozen model's cache over `domain_tokens [D, M]`,
        gates at the importance start when the trainer has `unit_scores`."""
        if self.kcfg.gate_init == "importance" and self.start_log_alphas is None:
            raise ValueError("gate_init='importance' needs unit_scores (a one-shot importance score per head and "
                             "neuron, e.g. baselines.taylor_scores) to start the gates: KoffTrainer(..., "
                             "unit_scores=...)")
        state = self._init()
        if self.start_log_alphas is not None:
            state = state.replace(gates=jax.device_put({**state.gates, **self.start_log_alphas},
                                                       self.state_shardings.gates))
        if self.kcfg.memory_init == "prefill" and self.kcfg.memory_slots:
            k, v = self._prefill(domain_tokens, self.kcfg.num_domains)
            state = state.replace(memory={**state.memory, "k": jax.device_put(k, self.state_shardings.memory["k"]),
                                          "v": jax.device_put(v, self.state_shardings.memory["v"])})
        return state

    def _prefill(self, domain_tokens, num_domains: int):
        M = self.kcfg.memory_slots
        if domain_tokens is None:
            raise ValueError("memory_init='prefill' needs domain_tokens: the first memory_slots tokens of each "
                             "domain's text, shape [num_domains, memory_slots]; or set memory_init='random'")
        tokens = np.asarray(domain_tokens)
        if tokens.shape != (num_domains, M):
            raise ValueError(f"domain_tokens has shape {tokens.shape}, expected ({num_domains}, {M}) "
                             "(one row of memory_slots tokens per domain)")
        with self.backbone.context():
            return prefill_kv(self.backbone.decoder(self.backbone.params), jnp.asarray(tokens, jnp.int32))

    def grow(self, old: TrainState, domain_tokens: np.ndarray | None = None) -> TrainState:
        """This trainer's (larger) table holding `old`'s rows unchanged, new rows freshly initialised.

        Gates, multipliers, optimiser states, step and RNG carry over; the new domains'
        rows start like any fresh row (prefill from `domain_tokens [new, M]` or random).
        """
        old_d, new_d = old.num_domains, self.kcfg.num_domains
        if new_d <= old_d:
            raise ValueError(f"grow() needs a larger table: trainer has {new_d} domains, state has {old_d}")
        fresh = self._init()
        if self.kcfg.memory_init == "prefill" and self.kcfg.memory_slots:
            k, v = self._prefill(domain_tokens, new_d - old_d)
            fresh = fresh.replace(memory={**fresh.memory, "k": fresh.memory["k"].at[old_d:].set(k),
                                          "v": fresh.memory["v"].at[old_d:].set(v)})
        put = lambda new, prev: new.at[:old_d].set(prev)  # noqa: E731
        state = old.replace(
            memory=jax.tree.map(put, fresh.memory, old.memory),
            memory_opt=jax.tree.map(put, fresh.memory_opt, old.memory_opt))
        return jax.device_put(state, self.state_shardings)

    # -- batches ------------------------------------------------------------
    def place_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """`ShardedBackbone.place_batch` for this trainer's table, refusing batches `accum_steps` cannot split."""
        placed = self.backbone.place_batch(batch, self.kcfg.num_domains)
        if np.shape(batch["inputs"])[0] % self.kcfg.accum_steps:
            raise ValueError(f"batch size {np.shape(batch['inputs'])[0]} is not a multiple of "
                             f"accum_steps={self.kcfg.accum_steps}")
        return placed

    # -- forward pieces -------------------------------------------------------
    def _loss_sums(self, decoder, scales, rows, inv, mb, with_kl: bool):
        """Per-example sums of CE (and KL to the dense model) over the loss mask."""
        head, neuron = scales
        dtype = jnp.dtype(self.kcfg.compute_dtype)
        memory = Hooks()
        if rows:
            memory = hooks_from_rows(rows, inv, self.kcfg.lora_scale, dtype)
        hooks = Hooks(head_scale=head, neuron_scale=neuron, memory_k=memory.memory_k, memory_v=memory.memory_v,
                      lora=memory.lora)
        kwargs = dict(positions=mb["positions"], segment_ids=mb["segment_ids"])
        hidden, _ = decoder(mb["inputs"], hooks=hooks, **kwargs)
        mask = mb["loss_mask"]
        ce = jnp.sum(token_cross_entropy(decoder, hidden, mb["targets"], chunk_size=self.kcfg.loss_chunk) * mask, 1)
        if not with_kl:
            return ce, jnp.zeros_like(ce)
        ref, _ = decoder(mb["inputs"], **kwargs)
        kl = token_kl(decoder, jax.lax.stop_gradient(ref), hidden, chunk_size=self.kcfg.loss_chunk)
        return ce, jnp.sum(kl * mask, 1)

    def _split(self, x: jax.Array) -> jax.Array:
        """`[B, ...]` -> `[A, B/A, ...]`: example i goes to micro-batch i % A, so data sharding is kept."""
        a = self.kcfg.accum_steps
        return jnp.swapaxes(x.reshape((x.shape[0] // a, a) + x.shape[1:]), 0, 1)

    def _micro_batches(self, batch, inv):
        """`[A, B/A, ...]` micro-batches of the token arrays and of each example's memory row (`_split`)."""
        return jax.tree.map(self._split, {k: batch[k] for k in TOKEN_KEYS}), self._split(inv)

    def _gate_sample(self, log_alphas, key):
        """One hard-concrete sample of every gate array, or `[S, ...]` stacked samples for `gate_samples` S > 1."""
        samples = self.kcfg.gate_samples
        if samples == 1:
            return gates_lib.sample_all(log_alphas, key)
        return jax.vmap(gates_lib.sample_all, in_axes=(None, 0))(log_alphas, jax.random.split(key, samples))

    # -- train step -----------------------------------------------------------
    def _final_masks(self, log_alphas, target=None):
        """The fixed mask if this trainer has one, else the deterministic top-k of `log_alphas` at `target`."""
        if self.fixed_mask is not None:
            return self.fixed_mask
        target = self.kcfg.target_sparsity if target is None else target
        return sparsity.deterministic_masks(self.cfg, log_alphas, target, self.kcfg.sparsity_over)

    def final_masks(self, state: TrainState) -> dict[str, np.ndarray]:
        """The 0/1 masks this trainer evaluates and exports `state` with (host arrays)."""
        return {name: np.asarray(m) for name, m in jax.device_get(self._final_masks(state.gates)).items()}

    def step_kind(self, step: int) -> str:
        """`"train"` while the gates train, `"memory"` after `kcfg.gate_steps` or always with a fixed mask."""
        return "memory" if self.fixed_mask is not None or step >= self.kcfg.gate_steps else "train"

    def _train_step(self, state: TrainState, backbone, batch, *, train_gates: bool = True):
        kcfg, D = self.kcfg, self.kcfg.num_domains
        decoder = self.backbone.decoder(backbone)
        batch = after_memory(batch, kcfg.memory_slots)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        slots, inv = distinct_rows(batch["domain"], D)
        with_memory = kcfg.joint or not train_gates  # prune-then-memory: no memories while the gates train
        rows = gather_rows(state.memory, slots) if with_memory else {}
        micro, micro_inv = self._micro_batches(batch, inv)
        sample_of = self._split(jnp.arange(batch["inputs"].shape[0]) % kcfg.gate_samples)  # each example's sample
        with_kl = kcfg.kl_weight > 0
        frozen_masks = None if train_gates else self._final_masks(state.gates)  # a constant: no gate gradients

        def micro_loss(log_alphas, rows, mb, mb_inv, mb_sample, key):
            scales = gates_lib.scales(self._gate_sample(log_alphas, key) if train_gates else frozen_masks)
            if train_gates and kcfg.gate_samples > 1:
                scales = tuple(s[mb_sample] for s in scales)  # [S, L, U] -> per example [b, L, U]
            ce, kl = self._loss_sums(decoder, scales, rows, mb_inv, mb, with_kl)
            return jnp.sum(ce) + kcfg.kl_weight * jnp.sum(kl), (ce, kl)

        grad_fn = jax.grad(micro_loss, argnums=(0, 1), has_aux=True)

        def accumulate(carry, xs):
            g_gates, g_rows = carry
            mb, mb_inv, mb_sample = xs
            (dg, dr), aux = grad_fn(state.gates, rows, mb, mb_inv, mb_sample, key)
            return (jax.tree.map(jnp.add, g_gates, dg), jax.tree.map(jnp.add, g_rows, dr)), aux

        zeros = (jax.tree.map(jnp.zeros_like, state.gates), jax.tree.map(jnp.zeros_like, rows))
        (g_gates, g_rows), (ce, kl) = jax.lax.scan(
            accumulate, zeros, (micro, micro_inv, sample_of))
        ce, kl = ce.T.reshape(-1), kl.T.reshape(-1)  # back to batch order
        tokens_per_example = jnp.sum(batch["loss_mask"], 1)
        num_tokens = jnp.maximum(jnp.sum(tokens_per_example), 1.0)
        g_gates = jax.tree.map(lambda g: g / num_tokens, g_gates)
        g_rows = jax.tree.map(lambda g: g / num_tokens, g_rows)

        if train_gates:
            target = sparsity.target_at(state.step, kcfg.target_sparsity, kcfg.warmup_steps, self.start_sparsity)
            gate_update = (self._projected_gate_update if kcfg.controller == "projection"
                           else self._lagrangian_gate_update)
            lag, gates, gate_opt, multipliers, lambda_opt = gate_update(state, g_gates, target)
            keep = sparsity.keep_probs(state.gates)
        else:
            target = jnp.float32(kcfg.target_sparsity)
            lag, gates, gate_opt, multipliers, lambda_opt = (
                jnp.zeros(()), state.gates, state.gate_opt, state.multipliers, state.lambda_opt)
            keep = frozen_masks
        memory, memory_opt = state.memory, state.memory_opt
        if with_memory and rows:
            new_rows, row_opt = rowsparse.update(g_rows, rowsparse.gather(memory_opt, slots), rows, lr=kcfg.memory_lr,
                                                 b1=kcfg.adam_b1, b2=kcfg.adam_b2, eps=kcfg.adam_eps)
            memory, memory_opt = scatter_rows(memory, slots, new_rows), rowsparse.scatter(memory_opt, slots, row_opt)
        new_state = state.replace(
            step=state.step + 1, gates=gates, multipliers=multipliers, gate_opt=gate_opt, lambda_opt=lambda_opt,
            memory=memory, memory_opt=memory_opt)

        remaining = sparsity.remaining_params(self.cfg, keep)
        metrics = {
            "loss": jnp.sum(ce) / num_tokens,
            "kl": jnp.sum(kl) / num_tokens,
            "lagrangian": lag,
            "loss_sum_by_domain": jax.ops.segment_sum(ce, batch["domain"], D),
            "tokens_by_domain": jax.ops.segment_sum(tokens_per_example, batch["domain"], D),
            "expected_sparsity": sparsity.sparsity(self.cfg, remaining, "prunable"),
            "expected_sparsity_all": sparsity.sparsity(self.cfg, remaining, "all"),
            "target": target,
            "polarised": controller.polarised_fraction(state.gates),
            "lambda1": state.multipliers["lambda1"],
            "lambda2": state.multipliers["lambda2"],
            "tokens": num_tokens,
        }
        return new_state, metrics

    def _projected_gate_update(self, state: TrainState, g_gates, target):
        """Step the gates on the LM gradient alone, then project them onto the scheduled expected sparsity."""
        gates, gate_opt = controller.projected_update(self.cfg, self.kcfg, self.gate_tx, state.gates, state.gate_opt,
                                                      g_gates, state.step, target)
        return jnp.zeros(()), gates, gate_opt, state.multipliers, state.lambda_opt

    def _lagrangian_gate_update(self, state: TrainState, g_gates, target):
        """Add the Lagrangian's gradient to the gates' LM gradient; step the gates (Adam, then clamp) and the
        multipliers (ascent)."""
        kcfg = self.kcfg

        def constraint(log_alphas):
            s_hat = sparsity.expected_sparsity(self.cfg, log_alphas, kcfg.sparsity_over)
            units = sparsity.num_units(log_alphas)
            return sparsity.lagrangian(state.multipliers, s_hat, target, units), s_hat

        (lag, s_hat), lg_gates = jax.value_and_grad(constraint, has_aux=True)(state.gates)
        g_gates = jax.tree.map(jnp.add, g_gates, lg_gates)
        updates, gate_opt = self.gate_tx.update(g_gates, state.gate_opt, state.gates)
        clamp = kcfg.log_alpha_clamp
        gates = jax.tree.map(lambda la: jnp.clip(la, -clamp, clamp), optax.apply_updates(state.gates, updates))
        ascent = sparsity.multiplier_ascent_grads(s_hat, target)
        updates, lambda_opt = self.lambda_tx.update(jax.tree.map(jnp.negative, ascent), state.lambda_opt)
        return lag, gates, gate_opt, optax.apply_updates(state.multipliers, updates), lambda_opt

    def train_step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimiser step (a gate step, or a memory step: see `step_kind`).

        `state` is donated (do not reuse it). Metrics are replicated arrays.
        """
        batch = self.place_batch(batch)
        kind = self.step_kind(int(state.step))
        with self.backbone.context():
            return self.step_function(kind, batch)(*self._step_args(kind, state, self.backbone.params, batch))

    # -- eval step ------------------------------------------------------------
    def _eval_step(self, state: TrainState, backbone, batch, target):
        D = self.kcfg.num_domains
        decoder = self.backbone.decoder(backbone)
        batch = after_memory(batch, self.kcfg.memory_slots)
        masks = self._final_masks(state.gates, target)
        scales = gates_lib.scales(masks)
        slots, inv = distinct_rows(batch["domain"], D)
        rows = gather_rows(state.memory, slots)
        with_memory, _ = self._loss_sums(decoder, scales, rows, inv, batch, False)
        without_memory, _ = self._loss_sums(decoder, scales, {}, inv, batch, False)
        remaining = sparsity.remaining_params(self.cfg, masks)
        by_domain = functools.partial(jax.ops.segment_sum, segment_ids=batch["domain"], num_segments=D)
        return {
            "loss_sum_memory": by_domain(with_memory),
            "loss_sum_no_memory": by_domain(without_memory),
            "tokens": by_domain(jnp.sum(batch["loss_mask"], 1)),
            "sparsity": sparsity.sparsity(self.cfg, remaining, "prunable"),
            "sparsity_all": sparsity.sparsity(self.cfg, remaining, "all"),
        }

    def eval_step(self, state: TrainState, batch: Mapping[str, Any], target: float | None = None) -> dict:
        """Per-domain loss sums under the deterministic mask at `target` (default: the final target).

        A trainer with a `fixed_mask` evaluates under that mask; `target` is then unused.
        """
        batch = self.place_batch(batch)
        target = jnp.float32(self.kcfg.target_sparsity if target is None else target)
        with self.backbone.context():
            return self.step_function("eval", batch)(*self._step_args("eval", state, self.backbone.params, batch,
                                                                      target))

    def evaluate(self, state: TrainState, batches, target: float | None = None) -> dict[str, np.ndarray]:
        """Per-domain mean loss and perplexity with and without memory over `batches` (NaN for unseen domains).

        With several processes each passes its own data shard's batches, whose counts may differ by one: the
        processes with fewer step through empty batches, so every process takes part in every step.
        """
        batches = list(batches)
        if not batches:
            raise ValueError("evaluate() got no batches")
        totals: dict[str, np.ndarray] = {}
        for batch in multihost.padded_to_longest(batches):
            out = jax.device_get(self.eval_step(state, batch, target))
            for name in ("loss_sum_memory", "loss_sum_no_memory", "tokens"):
                totals[name] = totals.get(name, 0.0) + out[name]
        with np.errstate(invalid="ignore", divide="ignore"):
            tokens = np.where(totals["tokens"] > 0, totals["tokens"], np.nan)
            loss_mem, loss = totals["loss_sum_memory"] / tokens, totals["loss_sum_no_memory"] / tokens
        return {"loss_memory": loss_mem, "ppl_memory": np.exp(loss_mem), "loss_no_memory": loss,
                "ppl_no_memory": np.exp(loss), "tokens": totals["tokens"]}

    # -- compilation ------------------------------------------------------------
    @staticmethod
    def _step_args(kind: str, state, backbone, batch, target=None) -> tuple:
        """Step `kind`'s arguments in its order: state, backbone params, batch, and for `"eval"` the target.

        The one place the order is written: calls, in/out shardings and `compilable_step` all use it.
        """
        return (state, backbone, batch) + ((target,) if kind == "eval" else ())

    def step_function(self, kind: str, batch: dict[str, jax.Array]):
        """The jitted `"train"` (gate), `"memory"` (frozen mask) or `"eval"` step for batches shaped like `batch`.

        Explicit in/out shardings, state donated by the train steps; one compilation
        per step kind and batch layout (also what `sparsemem compile` lowers).
        """
        fns = {"train": self._train_step, "memory": functools.partial(self._train_step, train_gates=False),
               "eval": self._eval_step}
        if kind not in fns:
            raise ValueError(f"unknown step kind {kind!r}; choose from {sorted(fns)}")
        key = (kind, tuple((k, v.shape, v.sharding) for k, v in sorted(batch.items())))
        if key not in self._compiled:
            rep = self.backbone.replicated
            train = kind != "eval"
            batch_sh = {k: v.sharding for k, v in batch.items()}
            self._compiled[key] = jax.jit(
                fns[kind], in_shardings=self._step_args(kind, self.state_shardings, self.backbone.shardings,
                                                        batch_sh, rep),
                out_shardings=(self.state_shardings, rep) if train else rep,
                donate_argnums=(0,) if train else ())
        return self._compiled[key]

    def compilable_step(self, kind: str, rows: int, seq_len: int) -> tuple[Any, tuple]:
        """`(jitted step, its abstract arguments)` for global batches of `rows` x `seq_len` tokens.

        What `sparsemem compile` lowers (under `self.backbone.context()`): the function a
        run executes, with the state, backbone and batch shapes, dtypes and shardings a
        run passes it.
        """
        batch = self.backbone.abstract_batch(rows, seq_len)
        target = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.backbone.replicated)
        return (self.step_function(kind, batch),
                self._step_args(kind, self.abstract_state, self.backbone.params, batch, target))
