"""Decode slots: prompts prefilled together and decoded in slots give `generate`'s tokens alone, also after a slot
moves and fewer rows are decoded."""

import numpy as np
import pytest

from sparsemem.serve.compaction import CompactLayout, compact_decoder
from sparsemem.serve.generate import SamplingConfig, generate_ids
from sparsemem.serve.memory import MemoryBank
from sparsemem.serve.sampling import SamplingRows
from sparsemem.serve.slots import IDLE, SlotEngine, row_buckets
from test_serve_compact import DOMAINS, hard_masks, random_decoder, random_table, tiny


@pytest.fixture(scope="module")
def setup():
    cfg = tiny("gemma3")
    layout = CompactLayout.from_masks(cfg, hard_masks(cfg))
    return compact_decoder(random_decoder(cfg), layout), MemoryBank(cfg, layout, DOMAINS, random_table(cfg), 0.7)


@pytest.mark.parametrize("count", [1, 5, 8, 13, 32, 100])
def test_row_buckets_cover_every_busy_count_with_little_waste(count):
    buckets = row_buckets(count)
    assert buckets == sorted(set(buckets)) and buckets[-1] == count
    for busy in range(1, count + 1):
        rows = next(b for b in buckets if b >= busy)
        assert rows <= max(2 * busy if busy < 8 else 1.5 * busy, 1)


def test_slots_decode_as_generate_alone(setup):
    """Three prompts of one bucket (two domains, one sampled, and the bare backbone) prefilled together into slots
    0, 1 and 3 of 5 (a fourth, padding row goes nowhere), a longer one alone into slot 4; after two steps slot 4
    moves to slot 2 and the steps decode 4 rows: every request's tokens equal `generate` alone."""
    model, bank = setup
    pad = model.cfg.pad_id
    requests = {0: ([2, 17, 33, 4], None, SamplingConfig(max_new_tokens=7)),
                1: ([2, 8], "fr", SamplingConfig(max_new_tokens=7, temperature=0.9, seed=3)),
                3: ([2, 40, 41], "en", SamplingConfig(max_new_tokens=7)),
                4: ([2, 5, 9, 11, 40, 7, 3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], "de",
                    SamplingConfig(max_new_tokens=7))}
    engine = SlotEngine(model, bank, count=5, context=32)
    settings = SamplingRows.of([IDLE] * 5)
    tokens, steps = np.zeros(5, np.int32), np.ones(5, np.int32)
    got = {}
    for group in ([0, 1, 3], [4]):
        prompts, domains, sampling = zip(*(requests[slot] for slot in group))
        picked = engine.admit(group, list(prompts), list(domains), list(sampling), pad)
        assert len(picked.ids) == len(group)
        for row, slot in enumerate(group):
            settings.set_row(slot, requests[slot][2])
            tokens[slot], got[slot] = picked.ids[row], [int(picked.ids[row])]
    where = {slot: slot for slot in requests}
    for step in range(6):
        if step == 2:
            engine.move(4, 2)
            where[4] = 2
            tokens[2], steps[2] = tokens[4], steps[4]
            settings.set_row(2, requests[4][2])
        picked = engine.step(tokens, settings, steps, busy=max(where.values()) + 1)
        assert len(picked.ids) == (5 if step < 2 else 4)
        for request, slot in where.items():
            got[request].append(int(picked.ids[slot]))
        tokens[:len(picked.ids)], steps[:len(picked.ids)] = picked.ids, steps[:len(picked.ids)] + 1
    for request, (prompt, domain, sampling) in requests.items():
        want = generate_ids(model, [prompt], sampling, pad_id=pad,
                            memory=bank.rows([domain]) if domain else None)[0]
        assert got[request] == want, request
