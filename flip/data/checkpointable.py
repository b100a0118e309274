"""tf.data settings shared by the training input pipelines whose iterators are saved in
checkpoints (`flip.data.laion`, `flip.data.classification`): options that keep the order
deterministic and let the iterator be saved, a bounded prefetch, and "forever" as a finite range.
"""

import tensorflow as tf

# Host batches made ahead of the train step. A fixed small number rather than AUTOTUNE: prefetched
# batches are part of every saved iterator state (~batch x S x S x 3 bytes each).
PREFETCH_BATCHES = 2
FOREVER = 2**62  # "repeat forever" as a finite range (checkpointable like any range)
DEFAULT_SHUFFLE_BUFFER = 10_000  # encoded examples per host (checkpoint size: x mean record size)


def options() -> tf.data.Options:
  """Deterministic order; iterator saving that accepts seeded shuffles' seed generators.

  `Dataset.shuffle` (with a seed, or built inside a function such as a per-epoch `flat_map`)
  carries a seed generator resource that tf.data's save refuses as "external state" under the
  default policy. Its seeds are explicit and the shuffle's buffer and RNG position are part of the
  saved iterator state, so nothing outside the checkpoint is needed to resume; the resume tests
  prove it.
  """
  result = tf.data.Options()
  result.deterministic = True
  result.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return result
