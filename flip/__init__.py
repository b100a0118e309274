"""FLIP-style masked contrastive pretraining, zero-shot evaluation and the MAE family on t5x.

The package is a library (models, losses, partitioning, optimisation, data, evaluation) driven by
one training loop (`flip.train`) and the absl entry point `main.py` at the repository root.

Importing the package changes nothing in the process: the process-wide set-up (the C allocator on
JAX's CPU backend, TensorFlow kept off the GPUs, quieter C++ logs) is
`flip.process_setup.configure_process()`, which entry points call first.
"""

__version__ = "0.1.0"
