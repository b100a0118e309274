"""FLIP-style masked contrastive pretraining, zero-shot evaluation and the MAE family on t5x.

The package is a library (models, losses, partitioning, optimisation, data, evaluation) driven by
one training loop (`flip.train`) and the absl entry point `main.py` at the repository root.
"""

# Before anything else starts threads: see flip/host_memory.py (opt out: FLIP_KEEP_FREED_MEMORY=0).
from flip import host_memory  # pylint: disable=unused-import

__version__ = "0.1.0"
