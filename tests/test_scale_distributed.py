"""Multi-host correctness on one machine: 2 processes (`jax.distributed`, loopback), each reading its own
data shard, train exactly like one process on the concatenated batches.

The test starts this file twice as a script (`python test_scale_distributed.py ...`, 2 CPU devices
each, coordinator on 127.0.0.1 at a free port); the single-process reference runs in the test itself.
"""

import json
import os
import socket
import subprocess
import sys

if __name__ == "__main__":  # a worker: its own devices, set before jax starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sparsemem.data.pipeline import Shard, train_batches  # noqa: E402
from sparsemem.data.sources import DomainSource  # noqa: E402
from sparsemem.koff.config import KoffConfig  # noqa: E402
from sparsemem.models.config import preset  # noqa: E402
from sparsemem.models.decoder import Decoder  # noqa: E402
from sparsemem.parallel.mesh import make_mesh  # noqa: E402
from sparsemem.train.trainer import KoffTrainer  # noqa: E402

CFG = preset("llama-3.2-1b").replace(num_layers=2, vocab_size=128, d_model=32, d_ff=64, num_heads=4,
                                     num_kv_heads=2, head_dim=8)
KCFG = KoffConfig(num_domains=2, memory_slots=4, lora_rank=2, memory_init="random", target_sparsity=0.2,
                  total_steps=4, warmup_fraction=0.5, memory_lr=1e-2)
PROCESSES, DEVICES_PER_PROCESS, ROWS_PER_PROCESS, SEQ_LEN, STEPS = 2, 2, 4, 16, 3


class WordTokenizer:
    """Word -> stable id; enough for the pipeline's packing."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode_batch(self, texts, *, add_bos=True):
        ids = [[3 + sum(map(ord, w)) % (CFG.vocab_size - 3) for w in t.split()] for t in texts]
        return [[self.bos_id] * add_bos + i for i in ids]


def sources():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [DomainSource(name, [{"text": " ".join(words[(d * 5 + i + j) % len(words)] for j in range(3 + i % 7))}
                                for i in range(24)]) for d, name in enumerate(("aa", "bb"))]


def batches(shard):
    return train_batches(sources(), WordTokenizer(), seq_len=SEQ_LEN, batch_size=ROWS_PER_PROCESS, seed=3,
                         shard=shard)


def train_losses(devices, batch_stream):
    trainer = KoffTrainer(Decoder(CFG, rngs=nnx.Rngs(0)), KCFG, make_mesh({"data": len(devices)}, devices=devices))
    state, losses = trainer.init(), []
    for _ in range(STEPS):
        state, metrics = trainer.train_step(state, next(batch_stream))
        losses.append(float(metrics["loss"]))
    return losses


def stacked(streams):
    """One process's view of the global batch: every shard's rows in process order."""
    while True:
        rows = [next(stream) for stream in streams]
        yield {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


def worker(coordinator: str, process_id: int, out: str) -> None:
    jax.distributed.initialize(coordinator, PROCESSES, process_id, initialization_timeout=60)
    assert jax.process_count() == PROCESSES and len(jax.devices()) == PROCESSES * DEVICES_PER_PROCESS
    losses = train_losses(jax.devices(), batches(Shard.of_jax_process()))  # this process's own shard
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
    jax.distributed.shutdown()


def test_two_processes_train_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "losses.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    workers = [subprocess.Popen([sys.executable, __file__, f"127.0.0.1:{port}", str(i), str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(PROCESSES)]
    try:
        logs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)

    expected = train_losses(jax.devices()[:PROCESSES * DEVICES_PER_PROCESS],
                            stacked([batches(Shard(i, PROCESSES)) for i in range(PROCESSES)]))
    np.testing.assert_allclose(json.loads(out.read_text()), expected, rtol=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
