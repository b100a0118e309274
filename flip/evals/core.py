"""The shared core of every evaluator: sharded, padded, counted evaluation over a data source.

Sharding. Images, labels and a validity mask are batched over the mesh's data axis exactly like
training batches: each process reads its shard of the source from `partitioner.get_data_layout`,
and host batches become global arrays with the partitioner's batch sharding
(`ShardedEval.to_global`); arrays every process holds in full (prompt tokens, class weights, a
fixed image batch) are placed with `ShardedEval.full_to_global`. Parameters keep the training
sharding (the context's axes), so evaluation never re-derives them.

Padding and counting. Every process pads its shard with invalid examples (zeros, `valid=False`)
to the same number of batches, so the last partial batch is counted once and every process runs
the same number of steps; the total of valid examples is checked against the source's count.

Top-k (`topk_counts`, the one tie rule of zero-shot and classification): an example counts as
correct when fewer than k classes score at least as high as its label, so ties count against the
model (a constant model scores 0 top-1); k is capped by the number of classes, and the metric is
still named `top5`. Metrics are fractions in [0, 1] plus `num_images`.

Also here: `EvalError` (an evaluation that cannot run, one line naming the key, path or data set;
`EvalConfigError` when the cause is a config value, which main.py reports like any config
problem), `format_metrics` (the printed form of metrics) and `report_eval_only` (eval_only's
tensorboard scalars at the checkpoint's step and its one printed line).

A source is any object with `name`, `num_examples` and `dataset(shard_index, num_shards,
image_size[, crop_fraction])` -> tf.data.Dataset of dicts (`flip.data.eval_sources` sources, or an
in-memory one in tests); classification sources also have `classnames`.
"""

import math
import re
import sys
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

from absl import logging
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np

from flip import config as config_lib

Array = jax.Array
Metrics = Dict[str, float]

TOPK = 5  # CLIP/FLIP and MAE report top-1 and top-5
IMAGE_AXES = ("batch", None, None, None)
TOKEN_AXES = ("batch", None)
VECTOR_AXES = ("batch",)
_COUNT_SUFFIXES = ("/num_images", "/num_pairs", "/num_skipped")
_LOSS_SUFFIX = "loss"


class EvalError(ValueError):
  """An evaluation that cannot run, in one line naming the key, path or data set."""


class EvalConfigError(EvalError, config_lib.ConfigError):
  """An evaluation refused because of a config value (one line naming the key)."""


def topk_counts(logits: Array, labels: Array, valid: Array, k: int) -> Tuple[Array, Array, Array]:
  """(top-1 hits, top-k hits, valid examples) as int32 scalars, with ties against the model."""
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
  rank = jnp.sum(logits >= label_logit, axis=1) - 1
  count = lambda hit: jnp.sum(hit & valid, dtype=jnp.int32)
  return count(rank < 1), count(rank < k), jnp.sum(valid, dtype=jnp.int32)


class ShardedEval:
  """One evaluation's batch layout over the mesh: shards, padding, placement and counting."""

  def __init__(self, partitioner: Any, batch_size: int, image_size: int,
               crop_fraction: Optional[float] = None, key: str = "batch_size"):
    data_size = partitioner.data_mesh_size
    if batch_size <= 0 or batch_size % data_size:
      raise EvalConfigError(f"{key} {batch_size} is not divisible by the data-parallel size "
                            f"{data_size}")
    self.partitioner = partitioner
    self.batch_size = batch_size
    self.image_size = image_size
    self.crop_fraction = crop_fraction
    self.layout = partitioner.get_data_layout(batch_size)
    self.local_batch = batch_size // self.layout.num_shards
    to_mesh = lambda axes: nn_partitioning.logical_to_mesh_axes(axes,
                                                                partitioner.logical_axis_rules)
    self.image_spec = to_mesh(IMAGE_AXES)
    self.token_spec = to_mesh(TOKEN_AXES)
    self.vector_spec = to_mesh(VECTOR_AXES)
    self.replicated = jax.sharding.PartitionSpec()

  # --- host <-> global arrays -----------------------------------------------------------------
  def to_global(self, array: np.ndarray, spec: Any) -> Array:
    """This process's rows of a batch -> a global array with `spec`."""
    sharding = jax.sharding.NamedSharding(self.partitioner.mesh, spec)
    return jax.make_array_from_process_local_data(sharding, np.asarray(array))

  def full_to_global(self, array: np.ndarray, spec: Any) -> Array:
    """A host array every process holds in full -> a global array with `spec`."""
    array = np.asarray(array)
    sharding = jax.sharding.NamedSharding(self.partitioner.mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  # --- batches of a source --------------------------------------------------------------------
  def local_batches(self, source: Any) -> Tuple[int, Iterator[Dict[str, np.ndarray]]]:
    """This process's shard of `source`, padded with invalid examples to a common batch count."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top (tf only when evaluating)
    layout = self.layout
    if source.num_examples <= 0:
      raise EvalError(f"evaluation data {source.name!r} holds no examples")
    per_shard = int(math.ceil(source.num_examples / layout.num_shards))
    num_batches = int(math.ceil(per_shard / self.local_batch))
    crop = {} if self.crop_fraction is None else {"crop_fraction": self.crop_fraction}
    ds = source.dataset(layout.shard_id, layout.num_shards, self.image_size, **crop)
    ds = ds.map(lambda ex: dict(ex, valid=tf.constant(True)))
    pad_example = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()}
    pad_example["valid"] = tf.constant(False)
    padding = tf.data.Dataset.from_tensors(pad_example).repeat()
    ds = ds.concatenate(padding).take(num_batches * self.local_batch)
    ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return num_batches, ds.as_numpy_iterator()

  def check_count(self, source: Any, counted: int) -> None:
    if counted != source.num_examples:
      raise EvalError(f"evaluation data {source.name!r}: counted {counted} images but the source "
                      f"holds {source.num_examples} (a shard was larger than expected)")

  def topk_accuracy(self, source: Any, prefix: str,
                    count_batch: Callable[[Array, Array, Array], Tuple[Array, Array, Array]]
                    ) -> Metrics:
    """Top-1/top-k of a labelled source: `count_batch(images, labels, valid)` (global arrays)
    returns `topk_counts` of one batch; labels outside the classes are refused."""
    num_classes = len(source.classnames)
    _, batches = self.local_batches(source)
    counts = []
    for batch in batches:
      labels = batch["label"].astype(np.int32)
      bad = labels[batch["valid"] & ((labels < 0) | (labels >= num_classes))]
      if bad.size:
        raise EvalError(f"evaluation data {source.name!r} has label {int(bad[0])} outside "
                        f"[0, {num_classes}) classes")
      counts.append(count_batch(self.to_global(batch["image"], self.image_spec),
                                self.to_global(labels, self.vector_spec),
                                self.to_global(batch["valid"], self.vector_spec)))
    top1, topk, counted = np.sum(np.asarray(jax.device_get(counts), np.int64), axis=0)
    self.check_count(source, int(counted))
    return {f"{prefix}/top1": float(top1) / counted, f"{prefix}/top{TOPK}": float(topk) / counted,
            f"{prefix}/num_images": float(counted)}


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length on the host (zero rows stay zero)."""
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, np.finfo(x.dtype).tiny)


# --- reporting ----------------------------------------------------------------------------------

def format_metrics(metrics: Mapping[str, float]) -> str:
  """`key value | ...` sorted by key: counts as integers, losses with four decimals, every other
  metric (a fraction) as a percentage."""
  parts = []
  for key, value in sorted(metrics.items()):
    if key.endswith(_COUNT_SUFFIXES):
      parts.append(f"{key} {int(value)}")
    elif key.endswith(_LOSS_SUFFIX):
      parts.append(f"{key} {value:.4f}")
    else:
      parts.append(f"{key} {100.0 * value:.2f}%")
  return " | ".join(parts)


def checkpoint_step(ckpt_dir: str) -> int:
  match = re.search(r"checkpoint_(\d+)/?$", ckpt_dir)
  return int(match.group(1)) if match else 0


def report_eval_only(writer: Any, ckpt_dir: str, metrics: Metrics) -> None:
  """An eval_only result: scalars through `writer` (tensorboard) at the checkpoint's step, and one
  `eval_only <checkpoint>: ...` line (logged; printed by process 0)."""
  writer.write_scalars(checkpoint_step(ckpt_dir), metrics)
  writer.flush()
  line = f"eval_only {ckpt_dir}: {format_metrics(metrics)}"
  logging.info("%s", line)
  if jax.process_index() == 0:
    print(line, file=sys.stdout, flush=True)
