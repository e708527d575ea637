"""Decode slots for continuous batching: a fixed set of rows, each with its own cache, domain and sampling.

The slots' caches live on the device as one `ServeCache` whose leaves carry a leading
slot axis (and a batch axis of 1 inside). `admit` prefills up to `PREFILL_ROWS` prompts
of one prompt bucket together (their length padded to a multiple of `PROMPT_BUCKET`),
each with its own domain's memory, straight into free slots; `step` runs one decode step
of the busy slots at once, each row at its own cache position (`jax.vmap` of the one-row
model) with its own LoRA and sampling settings, and `_write` stores the new keys/values
in place. The scheduler keeps its busy slots at the front (`move`), and a step runs the
first slots up to the busy count rounded up to a row bucket (`row_buckets`), so a step's
cost follows the load. The compiled programs are one prefill per prompt bucket and power
of two of prompts, and one decode step per row bucket, whatever the mix of domains and
settings. A slot holds `context + PROMPT_BUCKET` tokens, so a padded prompt and up to
`context - len(prompt)` new tokens always fit. A row without a domain keeps zero memory
hidden from its attention (`memory_visible`) and zero LoRA: it decodes as the bare
backbone. Idle slots inside the decoded range decode too (fixed shapes); their output is
ignored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sparsemem.serve.compact_decoder import CompactDecoder, RowMemory, ServeCache
from sparsemem.serve.generate import PROMPT_BUCKET
from sparsemem.serve.memory import MemoryBank, expand_rows
from sparsemem.serve.sampling import Picked, SamplingConfig, SamplingRows, pick

PREFILL_ROWS = 8  # the most prompts one prefill takes
IDLE = SamplingConfig(max_new_tokens=1)  # an empty slot's settings: greedy, no log-probabilities


@struct.dataclass
class Slots:
    """Every slot's cache (leaves `[N, ...]`) and LoRA (per layer `{proj: (a [N, 1, in, r], b [N, 1, r, out])}`)."""

    cache: ServeCache
    lora: tuple
    lora_scale: float = struct.field(pytree_node=False, default=1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "length"), donate_argnames=("slots",))
def _admit(graphdef, state, slots: Slots, targets, tokens, segments, memory: RowMemory | None, visible,
           settings: SamplingRows, length: int) -> tuple[Picked, Slots]:
    """Prefill the rows of `tokens [B, T]` together, each into slot `targets[b]` (one past the last slot: dropped)."""
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    if memory is not None:  # a row without a domain keeps zero LoRA (its KV memory is hidden by `visible`)
        memory = memory.replace(lora=jax.tree.map(lambda x: jnp.where(visible[:, None, None], x, 0), memory.lora))
    cache = model.init_cache(batch, length, memory, visible)
    hidden, cache = model(tokens, segment_ids=segments, cache=cache, memory=memory)
    picked = pick(model.logits(hidden[:, -1]), settings, jnp.zeros((batch,), jnp.int32))

    def per_slot(x):  # [B, ...] -> the slots' layout [B, 1, ...]; the cache's token count () -> [B]
        return jnp.broadcast_to(x, (batch,)) if x.ndim == 0 else x[:, None]

    put = functools.partial(jax.tree.map, lambda every, new: every.at[targets].set(per_slot(new), mode="drop"))
    lora = put(slots.lora, memory.lora) if slots.lora else ()
    return picked, slots.replace(cache=put(slots.cache, cache), lora=lora)


@struct.dataclass
class Written:
    """What one decode step adds to each decoded slot's cache: the new token's keys/values per layer
    (`[rows, 1, 1, K'_l, Dh]`), and the slots' segment ids, next positions and token counts after it."""

    k: tuple
    v: tuple
    segment_ids: jax.Array
    next_position: jax.Array
    index: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "rows"))
def _decode(graphdef, state, slots: Slots, tokens, settings: SamplingRows, steps, rows: int) -> tuple[Picked, Written]:
    """One decode step of the first `rows` slots: their next tokens and what to write into their caches.

    The caches are only read here (`_write` stores the new entries in place): a program that both read the
    slots' caches and updated them in place made XLA copy every layer's whole cache, twice, per step.
    """
    model = nnx.merge(graphdef, state)

    def one_row(token, cache, lora):
        memory = RowMemory(k=(), v=(), lora=lora, lora_scale=slots.lora_scale) if lora else None
        at = cache.write_index
        hidden, cache = model(token[None, None], cache=cache, memory=memory)
        new = functools.partial(jax.tree.map, lambda x: jax.lax.dynamic_index_in_dim(x, at, axis=1))
        written = Written(k=new(cache.k), v=new(cache.v), segment_ids=cache.segment_ids,
                          next_position=cache.next_position, index=cache.index)
        return model.logits(hidden[:, -1])[0], written

    first = functools.partial(jax.tree.map, lambda x: x[:rows])
    logits, written = jax.vmap(one_row)(tokens[:rows], first(slots.cache), first(slots.lora))
    return pick(logits, first(settings), steps[:rows]), written


@functools.partial(jax.jit, donate_argnames=("slots",))
def _write(slots: Slots, written: Written) -> Slots:
    """`slots` with one decode step's new entries stored in place (the first `len(written.index)` slots)."""
    cache = slots.cache
    rows = written.index.shape[0]
    at = (jnp.arange(rows), 0, cache.write_index[:rows])
    store = functools.partial(jax.tree.map, lambda every, new: every.at[at].set(new[:, 0, 0]))
    return slots.replace(cache=cache.replace(
        k=store(cache.k, written.k), v=store(cache.v, written.v),
        segment_ids=cache.segment_ids.at[:rows].set(written.segment_ids),
        next_position=cache.next_position.at[:rows].set(written.next_position),
        index=cache.index.at[:rows].set(written.index)))


@functools.partial(jax.jit, donate_argnames=("slots",))
def _move(slots: Slots, source, target) -> Slots:
    """`slots` with slot `target` holding a copy of slot `source` (cache, memory and LoRA)."""
    return jax.tree.map(lambda every: every.at[target].set(every[source]), slots)


def row_buckets(count: int) -> list[int]:
    """The row counts a decode step is compiled for: powers of two, and from 8 on also 1.5 times a power of two
    (so a step runs at most 1.5 times the busy rows once there are many), up to `count`."""
    sizes = {1 << k for k in range(count.bit_length())} | {3 << k for k in range(2, count.bit_length())}
    return sorted({s for s in sizes if s < count} | {count})


class SlotEngine:
    """`count` decode slots of `model` (with `bank`'s domains) for prompts + new tokens up to `context`."""

    def __init__(self, model: CompactDecoder, bank: MemoryBank | None, count: int, context: int):
        if count < 1:
            raise ValueError(f"need at least one decode slot, got {count}")
        self.bank, self.count, self.buckets = bank, count, row_buckets(count)
        self.length = -(-context // PROMPT_BUCKET) * PROMPT_BUCKET + PROMPT_BUCKET
        self.graphdef, self.state = nnx.split(model)
        self._model = model
        self.blank = (jax.tree.map(jnp.zeros_like, bank.rows(bank.domains[:1])) if bank is not None else None)
        self.reset()

    def reset(self) -> None:
        """Every slot empty (after a failed step left the donated state unusable)."""
        cache = self._model.init_cache(1, self.length, self.blank, np.zeros(1, bool))
        lora = self.blank.lora if self.blank is not None else ()
        scale = self.blank.lora_scale if self.blank is not None else 1.0
        def stacked(x):  # committed to the device, as the steps' outputs are: one compiled program per shape
            return jax.device_put(jnp.zeros((self.count,) + x.shape, x.dtype), jax.local_devices()[0])

        self.slots = Slots(cache=jax.tree.map(stacked, cache), lora=jax.tree.map(stacked, lora), lora_scale=scale)

    def admit(self, targets: list[int], prompts: list[list[int]], domains: list[str | None],
              sampling: list[SamplingConfig], pad_id: int) -> Picked:
        """Prefill up to `PREFILL_ROWS` prompts together, prompt `i` with `domains[i]`'s memory (None: none) into
        slot `targets[i]`; their first tokens (host arrays, one row per prompt). Their padded lengths should be
        equal (one prompt bucket), so that each row computes what it would alone."""
        if not 1 <= len(prompts) <= PREFILL_ROWS:
            raise ValueError(f"admit takes 1 to {PREFILL_ROWS} prompts, got {len(prompts)}")
        rows = 1 << (len(prompts) - 1).bit_length()
        extra = rows - len(prompts)  # padding rows: a copy of the first prompt, written nowhere
        prompts, domains = prompts + prompts[:1] * extra, domains + domains[:1] * extra
        padded = -(-max(map(len, prompts)) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = np.full((rows, padded), pad_id, np.int32)
        segments = np.zeros((rows, padded), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, padded - len(prompt):] = prompt
            segments[row, padded - len(prompt):] = 1
        slots = np.asarray(targets + [self.count] * extra, np.int32)
        picked, self.slots = _admit(self.graphdef, self.state, self.slots, slots, tokens, segments,
                                    self._memory(domains), np.asarray([d is not None for d in domains]),
                                    SamplingRows.of(sampling + sampling[:1] * extra), length=self.length)
        return jax.tree.map(lambda x: x[:rows - extra], jax.device_get(picked))

    def _memory(self, domains: list[str | None]) -> RowMemory | None:
        """Per-row memory (a row without a domain gets the first domain's, hidden by `_admit`), fetched row by row so
        that its programs' shapes depend on the row count only."""
        if self.bank is None:
            return None
        ids = self.bank.domain_ids([d if d is not None else self.bank.domains[0] for d in domains])
        return expand_rows(self.bank.fetch(ids), jnp.arange(len(ids)), self.bank.lora_scale)

    def warm_up(self) -> None:
        """Compile the decode step for every row bucket and the first prompt bucket's prefill for every row count
        now rather than under load (the idle slots a step runs are overwritten when a request is admitted)."""
        tokens, steps = np.zeros(self.count, np.int32), np.zeros(self.count, np.int32)
        settings = SamplingRows.of([IDLE] * self.count)
        for busy in self.buckets:
            self.step(tokens, settings, steps, busy)
        largest = 1 << (min(self.count, PREFILL_ROWS) - 1).bit_length()
        for rows in (1 << k for k in range(largest.bit_length())):  # the first prompt bucket, written to no slot
            self.admit([self.count] * rows, [[0]] * rows, [None] * rows, [IDLE] * rows, pad_id=0)

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (the scheduler keeps its busy slots at the front this way)."""
        self.slots = _move(self.slots, np.int32(source), np.int32(target))

    def step(self, tokens: np.ndarray, settings: SamplingRows, steps: np.ndarray, busy: int) -> Picked:
        """One decode step of the slots below `busy` (rounded up to a row bucket): `tokens [N]` in, those slots'
        next tokens out (host arrays, one row per slot decoded)."""
        rows = next(size for size in self.buckets if size >= busy)
        picked, written = _decode(self.graphdef, self.state, self.slots, tokens, settings, steps, rows=rows)
        self.slots = _write(self.slots, written)
        return jax.device_get(picked)
