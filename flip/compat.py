"""Every use of another library's private API or undocumented on-disk layout, in one place.

Checked against jax and jaxlib 0.10.2, flax 0.12.8, t5x at commit
cc342d419ec3e3e9c4bf1df33c82330cafdc1e16, seqio 0.0.20, orbax-checkpoint 0.12.8 and tensorflow
2.21.0. tests/test_compat.py exercises each name below against the installed libraries (a real
two-process barrier, a real t5x checkpoint saved to disk), so the first upgrade that changes one of
them fails there, and nowhere else in the repository reaches into a private name.

What is here:
- `wait_at_barrier`: a barrier of jax's coordination service (the `jax.distributed` runtime). jax
  exposes no public barrier with a timeout of our choosing; its client is
  `jax._src.distributed.global_state.client`. Without a distributed client (one process, or
  `jax.distributed` not initialised) the barrier is a no-op.
- t5x's checkpoint layout on disk, which t5x writes but does not document as an interface:
  `checkpoint_<step>` directories holding the msgpack file `checkpoint` (written last, then the
  directory is renamed into place), the temporary directory `checkpoint_<step>.tmp-<timestamp>` of
  a save in progress, and the input iterator's TensorFlow checkpoint
  `train_ds-<shard:03>-of-<num_shards:03>` (files `<name>.index` and `<name>.data-*`) per data
  shard.
- `T5X_ARRAY_WRITER`: the name of the `t5x.checkpoints.Checkpointer` method that writes the
  arrays of a save into its temporary directory, called as `(self, tmp_dir, train_state, ...)`;
  tests replace it to inject a failing disk.

seqio and orbax are used through their public APIs only (nothing of theirs is here).
"""

import re

# --- jax: the coordination service's barrier ----------------------------------------------------


def wait_at_barrier(name: str, timeout_seconds: int) -> None:
  """Blocks until every process of the `jax.distributed` runtime reached the barrier `name`.

  A no-op without a distributed client. Raises (jaxlib's error, naming the barrier) when the
  others do not arrive within `timeout_seconds`. Each name may be used once per run.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    return
  client.wait_at_barrier(name, int(timeout_seconds) * 1000)


# --- t5x: the checkpoint layout -----------------------------------------------------------------

# The msgpack file inside a checkpoint directory; its presence marks a finalised checkpoint.
T5X_CHECKPOINT_FILE = "checkpoint"
T5X_CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
# The temporary directory of a save in progress: checkpoint_<step>.tmp-<timestamp>.
T5X_TMP_CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_(\d+)\.tmp-\d+$")
# The input iterator's state of a data shard: train_ds-<shard>-of-<num_shards>.
T5X_ITERATOR_STATE_PREFIX = "train_ds"
# tf.train.Checkpoint writes <prefix>.index and <prefix>.data-*; the index is written last.
TF_CHECKPOINT_INDEX_SUFFIX = ".index"
# Checkpointer method writing the arrays of a save: (self, tmp_dir, train_state, ...).
T5X_ARRAY_WRITER = "_write_state_to_tensorstore"


def t5x_checkpoint_dir_name(step: int) -> str:
  """t5x's directory name of the checkpoint of `step` (`checkpoint_<step>`)."""
  return f"checkpoint_{step}"


def t5x_iterator_state_name(shard_id: int, num_shards: int) -> str:
  """t5x's name of a data shard's iterator state (`train_ds-000-of-002`)."""
  return f"{T5X_ITERATOR_STATE_PREFIX}-{shard_id:03}-of-{num_shards:03}"
