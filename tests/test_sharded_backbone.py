"""ShardedBackbone: placed batches have exactly the layout AOT compiles for; weights keep the decoder's values."""

import jax
import numpy as np
import pytest
from flax import nnx

from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.parallel.mesh import make_mesh
from sparsemem.train.sharded_backbone import ShardedBackbone

CFG = preset("llama-3.2-1b").replace(num_layers=2, d_model=32, d_ff=64, num_heads=4, num_kv_heads=2, head_dim=8,
                                     vocab_size=128)


@pytest.fixture(scope="module")
def backbone():
    return ShardedBackbone(Decoder(CFG, rngs=nnx.Rngs(0)), make_mesh({"data": 4, "model": 2}), dtype="bfloat16")


def _batch(rows, seq_len):
    rng = np.random.default_rng(0)
    return {"inputs": rng.integers(0, CFG.vocab_size, (rows, seq_len)),
            "targets": rng.integers(0, CFG.vocab_size, (rows, seq_len)), "loss_mask": np.ones((rows, seq_len)),
            "segment_ids": np.ones((rows, seq_len), np.int64), "positions": np.tile(np.arange(seq_len), (rows, 1)),
            "domain": np.arange(rows) % 3}


def test_abstract_batch_is_the_placed_layout(backbone):
    placed = backbone.place_batch(_batch(8, 6), num_domains=3)
    abstract = backbone.abstract_batch(8, 6)
    assert {k: (v.shape, v.dtype, v.sharding) for k, v in placed.items()} == {
        k: (a.shape, a.dtype, a.sharding) for k, a in abstract.items()}
    assert placed["inputs"].sharding.shard_shape((8, 6)) == (2, 6) and placed["loss_mask"].dtype == np.float32


def test_weights_are_placed_by_their_logical_axes_and_the_decoder_is_unchanged(backbone):
    decoder = Decoder(CFG, rngs=nnx.Rngs(0))
    ours = nnx.to_pure_dict(backbone.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours), nnx.to_pure_dict(nnx.state(decoder)))
    wq = ours["layers"]["wq"]  # [L, d, H, Dh]: heads over the model axis (2)
    assert wq.sharding.shard_shape(wq.shape) == (CFG.num_layers, CFG.d_model, CFG.num_heads // 2, CFG.head_dim)
    assert backbone.decoder(backbone.params).dtype == np.dtype("bfloat16") and decoder.dtype == np.float32


def test_domains_outside_the_table_are_refused(backbone):
    with pytest.raises(ValueError, match="unknown domain id 2: the memory table has 2 domains"):
        backbone.place_batch(_batch(8, 6), num_domains=2)
