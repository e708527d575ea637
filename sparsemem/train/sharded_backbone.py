"""`ShardedBackbone`: a frozen decoder placed on a mesh once, and the batches placed to run through it.

Training, evaluation, scoring and ahead-of-time compilation all run functions of
`(backbone params, batch)` on one mesh under one rules table; this object owns those
four things so none of them re-derives a sharding or a batch dtype. Jitted functions
take `params` as an argument (never closed over, never donated) and rebuild the
module with `decoder(params)`. An abstract decoder (`nnx.eval_shape`) gives an abstract
backbone: `params` are `ShapeDtypeStruct`s with their shardings, for compiling only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsemem.models.decoder import Decoder
from sparsemem.parallel.mesh import make_mesh, state_shardings
from sparsemem.parallel.rules import axis_rules, current_rules, named_sharding

# Every batch array ([B, T] unless noted) and its dtype on the device.
BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
                "positions": np.int32, "domain": np.int32}  # domain: [B]
TOKEN_KEYS = tuple(k for k in BATCH_DTYPES if k != "domain")


class ShardedBackbone:
    """A decoder's frozen weights on `mesh` (by their `logical_axes` under `rules`), in compute `dtype`/`remat`."""

    def __init__(self, decoder: Decoder, mesh: Mesh | None = None, rules=None, *, dtype=None,
                 remat: str | None = None):
        self.cfg = decoder.cfg
        self.mesh = mesh if mesh is not None else make_mesh({"data": 1}, devices=jax.devices()[:1])
        self.rules = current_rules() if rules is None else tuple(rules)
        graphdef, params = nnx.split(decoder)
        compute = nnx.merge(graphdef, params)  # a view with these dtype/remat; `decoder` is unchanged
        if dtype is not None:
            compute.dtype = jnp.dtype(dtype)
        if remat is not None:
            compute.remat = remat
        self.decoder_def, params = nnx.split(compute)
        with self.context():
            self.shardings = state_shardings(params, self.mesh)
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        self.params = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                                    self.shardings) if self.abstract
                       else jax.device_put(params, self.shardings))

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and rules every function of the backbone traces and runs under."""
        with jax.set_mesh(self.mesh), axis_rules(self.rules):
            yield

    def decoder(self, params) -> Decoder:
        """The decoder module over `params` (inside a jitted function: its traced argument)."""
        return nnx.merge(self.decoder_def, params)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, key: str, rows: int, seq_len: int) -> NamedSharding:
        """Sharding of batch array `key` for a global batch of `rows`: rows along the logical `batch` axis."""
        shape = (rows,) if key == "domain" else (rows, seq_len)
        with axis_rules(self.rules):
            return named_sharding(self.mesh, ("batch",) + (None,) * (len(shape) - 1), shape)

    def abstract_batch(self, rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of a global batch, exactly as `place_batch` makes it."""
        return {key: jax.ShapeDtypeStruct((rows,) if key == "domain" else (rows, seq_len), dtype,
                                          sharding=self.batch_sharding(key, rows, seq_len))
                for key, dtype in BATCH_DTYPES.items()}

    def place_batch(self, batch: Mapping[str, np.ndarray], num_domains: int | None = None) -> dict[str, jax.Array]:
        """Check this process's host batch and put it on the mesh, sharded along `batch`.

        With several processes (multi-host), each passes its own rows (its data shard)
        and the global batch is their concatenation in process order. `num_domains`,
        when given, bounds the domain ids.
        """
        missing = [k for k in BATCH_DTYPES if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; a batch has {TOKEN_KEYS} [B, T] and domain [B]")
        b, t = np.shape(batch["inputs"])
        for key in TOKEN_KEYS:
            if np.shape(batch[key]) != (b, t):
                raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, expected {(b, t)}")
        domain = np.asarray(batch["domain"])
        if domain.shape != (b,):
            raise ValueError(f"batch['domain'] has shape {domain.shape}, expected ({b},)")
        if num_domains is not None and (domain.min() < 0 or domain.max() >= num_domains):
            raise ValueError(f"unknown domain id {int(domain.max() if domain.max() >= 0 else domain.min())}: "
                             f"the memory table has {num_domains} domains (0..{num_domains - 1})")
        processes = jax.process_count()  # each process passes its own rows; the global batch stacks them
        rows = b * processes
        out = {}
        for key, dtype in BATCH_DTYPES.items():
            value = np.asarray(batch[key], dtype)
            sharding = self.batch_sharding(key, rows, t)
            if processes > 1 and sharding.spec[0] is None:
                raise ValueError(f"global batch {rows} ({processes} processes x {b}) is not divisible by the "
                                 f"mesh's batch axes {dict(self.mesh.shape)}; change batch_size or the mesh")
            out[key] = jax.make_array_from_process_local_data(sharding, value, (rows,) + value.shape[1:])
        return out
