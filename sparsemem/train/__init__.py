"""KOFF training: train state, jitted sharded steps, the train loop with checkpoints."""

from sparsemem.train.state import TrainState
from sparsemem.train.trainer import KoffTrainer

__all__ = ["KoffTrainer", "TrainState"]
