"""Logits parity of the NNX decoder against `transformers` (PyTorch, float32) for every family.

Tolerance: max |ours - theirs| <= 1e-4 * max |theirs| (relative to the logit scale);
measured errors are around 1e-7 relative.
"""

import numpy as np
import jax.numpy as jnp
import pytest

from hf_reference import FAMILIES, make_reference, reference_logits
from sparsemem.checkpoints.hf import load_hf_checkpoint

RTOL = 1e-4


def assert_logits_close(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= RTOL, f"relative logits error {err:.2e} > {RTOL}"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_reference(request.param, folder)
    return reference, load_hf_checkpoint(folder)


def ours_logits(model, tokens, **kwargs):
    hidden, _ = model(jnp.asarray(tokens), **{k: jnp.asarray(v) for k, v in kwargs.items()})
    return model.logits(hidden)


def test_full_forward_longer_than_sliding_window(pair):
    reference, model = pair
    tokens = np.random.default_rng(0).integers(0, 160, (2, 17))  # Gemma's tiny window is 5
    assert_logits_close(ours_logits(model, tokens), reference_logits(reference, tokens))


def test_packed_documents_equal_separate_documents(pair):
    reference, model = pair
    rng = np.random.default_rng(1)
    lengths = [6, 9, 4]
    docs = [rng.integers(0, 160, (1, n)) for n in lengths]
    packed = np.concatenate(docs, axis=1)
    segments = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    ours = np.asarray(ours_logits(model, packed, segment_ids=segments))
    start = 0
    for doc, n in zip(docs, lengths):
        assert_logits_close(ours[:, start:start + n], reference_logits(reference, doc))
        start += n


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(pair, side):
    reference, model = pair
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 160, (2, 11))
    real = np.ones((2, 11), np.int64)
    if side == "left":
        real[0, :4] = 0
    else:
        real[0, -4:] = 0
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    theirs = reference_logits(reference, tokens, attention_mask=real, position_ids=positions)
    ours = np.asarray(ours_logits(model, tokens, segment_ids=real))
    valid = real.astype(bool)
    assert_logits_close(ours[valid], theirs[valid])
