"""The real Gemma-3-270M (embedded demo model): parity with transformers, knowledge, perplexity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer
from sparsemem.models.loss import token_cross_entropy
from sparsemem.serve.generate import SamplingConfig, generate_text

ENGLISH = (
    "The river flows slowly through the old town, past the market square and the church. In the summer, "
    "children swim near the bridge while their parents sit in the shade of the trees. The town was founded in "
    "the twelfth century by merchants who traded wool and salt along the river. Today it is known for its "
    "well-preserved houses, its small museum and a festival that takes place every year in August.")
GERMAN = (
    "Der Fluss fließt langsam durch die Altstadt, vorbei am Marktplatz und an der Kirche. Im Sommer schwimmen "
    "die Kinder in der Nähe der Brücke, während ihre Eltern im Schatten der Bäume sitzen. Die Stadt wurde im "
    "zwölften Jahrhundert von Kaufleuten gegründet, die entlang des Flusses mit Wolle und Salz handelten.")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(demo_folder):
    model = load_hf_checkpoint(demo_folder)
    return model, load_tokenizer(demo_folder, model.cfg)


def next_token_logprobs(model, ids):
    hidden, _ = model(jnp.asarray([ids]))
    return np.asarray(jax.nn.log_softmax(model.logits(hidden[0, -1])))


def test_logits_match_transformers_beyond_the_sliding_window(demo, demo_folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tokenizer = demo
    ids = tokenizer.encode((ENGLISH + " ") * 8)[:600]  # > the 512-token sliding window
    reference = transformers.AutoModelForCausalLM.from_pretrained(demo_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    hidden, _ = model(jnp.asarray([ids]))
    ours = np.asarray(model.logits(hidden))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4


def test_knows_capitals(demo):
    model, tokenizer = demo
    # Measured greedy continuation of "The capital of Germany is" on this Q4_K_M file is " the capital of the
    # German state of Bavaria" (transformers agrees on the same weights); " Berlin" is the third choice.
    top3 = np.argsort(-next_token_logprobs(model, tokenizer.encode("The capital of Germany is")))[:3]
    assert tokenizer.encode(" Berlin", add_bos=False)[0] in top3
    continuation = generate_text(model, tokenizer, ["The capital of Germany is Berlin. The capital of France is"],
                                 SamplingConfig(max_new_tokens=3))[0]
    assert continuation.startswith(" Paris")


@pytest.mark.parametrize("text, band", [(ENGLISH, (9.0, 18.0)), (GERMAN, (14.0, 30.0))], ids=["en", "de"])
def test_perplexity_of_prose(demo, text, band):
    """Measured: 12.8 (English), 20.6 (German); DESIGN.md reports about 15 and 25."""
    model, tokenizer = demo
    ids = jnp.asarray([tokenizer.encode(text)])
    hidden, _ = model(ids[:, :-1])
    perplexity = float(jnp.exp(token_cross_entropy(model, hidden, ids[:, 1:]).mean()))
    assert band[0] <= perplexity <= band[1]
