"""Joint KOFF training of the real Gemma-3-270M: the controller ends on target and the mask trained is the mask
evaluated."""

import numpy as np
import pytest

from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer
from sparsemem.koff.config import KoffConfig
from sparsemem.train import KoffTrainer

pytestmark = pytest.mark.slow

TEXT = ("The river flows slowly through the old town, past the market square and the church. In the summer, "
        "children swim near the bridge while their parents sit in the shade of the trees. The town was founded in "
        "the twelfth century by merchants who traded wool and salt along the river. Today it is known for its "
        "well-preserved houses, its small museum and a festival that takes place every year in August.",
        "Der Fluss fließt langsam durch die Altstadt, vorbei am Marktplatz und an der Kirche. Im Sommer schwimmen "
        "die Kinder in der Nähe der Brücke, während ihre Eltern im Schatten der Bäume sitzen. Die Stadt wurde im "
        "zwölften Jahrhundert von Kaufleuten gegründet, die entlang des Flusses mit Wolle und Salz handelten.")
T, SLOTS = 48, 8


def test_koff_trained_jointly_ends_on_target(demo_folder):
    decoder = load_hf_checkpoint(demo_folder)
    tokenizer = load_tokenizer(demo_folder, decoder.cfg)
    ids = [tokenizer.encode(text, add_bos=True) for text in TEXT]
    tokens = np.array([i[: T + 1] for i in ids])
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((2, T), np.float32),
                 segment_ids=np.ones((2, T), np.int32), positions=np.tile(np.arange(T), (2, 1)), domain=np.arange(2))
    kcfg = KoffConfig(num_domains=2, target_sparsity=0.12, total_steps=16, warmup_fraction=0.25,
                      polarise_fraction=0.25, gate_lr=0.3, memory_slots=SLOTS, lora_rank=4, lora_targets=("q", "v"))
    trainer = KoffTrainer(decoder, kcfg)
    state = trainer.init(np.array([i[T + 1: T + 1 + SLOTS] for i in ids]))
    history = []
    for _ in range(kcfg.total_steps):
        state, metrics = trainer.train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    final = trainer.evaluate(state, [batch])
    print([(round(h["expected_sparsity"], 4), round(h["polarised"], 3), round(h["loss"], 3)) for h in history],
          final["loss_memory"])
    assert abs(history[-1]["expected_sparsity"] - kcfg.target_sparsity) <= 0.005
    assert history[-1]["polarised"] >= 0.9
    realised = float(trainer.eval_step(state, batch)["sparsity"])
    assert abs(realised - kcfg.target_sparsity) <= 0.005
