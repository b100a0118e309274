"""Top-1/top-5 accuracy of a classifier task (linear probe, fine-tuning) on its held-out split.

`ClassificationEval` is a training eval hook (`hook(task, state, step) -> metrics`, returned by
the task's `eval_hooks`): it reads `config.data.eval` (`flip.data.classification`: tfds
validation split, image folder, or the demo's test split) with the evaluation resize + centre crop
(`config.aug.eval_crop_fraction`), runs the task's `logits` with the train state's parameters and
BatchNorm statistics under the partitioner (images, labels and a validity mask sharded over the
data axis like training batches; parameters and statistics keep the train state's sharding), and
counts hits on device. An image counts for top-k when fewer than k classes score at least as high
as its label (ties count against the model, `flip.evaluate`'s rule), k capped by the number of
classes. Every process pads its shard to the same number of batches with invalid examples, and
the total of valid images is checked against the source's count.

Metrics: `classification/<set>/top1`, `.../top5` (fractions) and `.../num_images`, printed in
`flip.evaluate.format_metrics`' format. `run_eval_only(config, workdir)` evaluates a checkpoint
(`config.pretrain_dir`, else the newest in workdir) the same way, with the BatchNorm statistics
saved in it; `main.py --config.eval_only=True` calls it for classifier tasks. Like
`flip.evaluate.run_eval_only` it prints one `eval_only <checkpoint>: ...` line and writes the
metrics into workdir's tensorboard events at the checkpoint's step.
"""

import math
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import flax
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flip import checkpoints
from flip import evaluate

Metrics = Dict[str, float]
TOPK = evaluate.TOPK
_IMAGE_AXES = ("batch", None, None, None)
_VECTOR_AXES = ("batch",)
DEFAULT_EVAL_BATCH_SIZE = 1024


def mutables_mesh_axes(task: Any, partitioner: Any) -> Dict[str, Any]:
  """PartitionSpecs of the task's non-parameter collections (e.g. batch_stats)."""
  variables = flax.core.unfreeze(jax.eval_shape(task.init_variables, jax.random.PRNGKey(0)))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  out = {}
  for name in variables:
    if name == "params" or name.endswith("_axes"):
      continue
    axes = nn_partitioning.get_axis_names(variables[f"{name}_axes"])
    out[name] = jax.tree.map(
        lambda a: nn_partitioning.logical_to_mesh_axes(a, partitioner.logical_axis_rules),
        flax.core.unfreeze(axes), is_leaf=is_spec)
  return out


class ClassificationEval:
  """Held-out top-1/top-5 of a classifier task; callable as a training eval hook."""

  def __init__(self, config: ml_collections.ConfigDict, source: Any,
               partitioner: Any = None, batch_size: int = DEFAULT_EVAL_BATCH_SIZE):
    self.config = config
    self.source = source
    self.batch_size = batch_size
    self.crop_fraction = config.aug.get("eval_crop_fraction")
    self._partitioner = partitioner
    self._step_fn = None
    self._task_id: Optional[int] = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  partitioner: Any = None) -> Optional["ClassificationEval"]:
    """The hook for `config.data.eval`, or None when that is empty. Data problems raise
    `flip.evaluate.EvalError` (one line) now, before training starts."""
    from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
    spec = config.data.get("eval", "")
    if not spec:
      return None
    try:
      source = classification.labelled_source(
          spec, classification.EVAL, int(config.data.get("eval_max_images", 0)),
          key="config.data.eval")
      classification.check_num_classes(source, config.data.num_classes, "config.data.eval")
    except classification.ClassificationDataError as err:
      raise evaluate.EvalError(str(err)) from None
    batch_size = int(config.data.get("eval_batch_size", DEFAULT_EVAL_BATCH_SIZE))
    if batch_size <= 0:
      raise evaluate.EvalError(f"config.data.eval_batch_size must be > 0, got {batch_size}")
    return cls(config, source, partitioner, batch_size)

  @property
  def partitioner(self):
    if self._partitioner is None:
      from flip import train  # pylint: disable=g-import-not-at-top (train imports the loop)
      self._partitioner = train.build_partitioner(self.config.partitioning)
    return self._partitioner

  def _specs(self) -> Tuple[Any, Any]:
    rules = self.partitioner.logical_axis_rules
    return (nn_partitioning.logical_to_mesh_axes(_IMAGE_AXES, rules),
            nn_partitioning.logical_to_mesh_axes(_VECTOR_AXES, rules))

  def _compiled_step(self, task: Any):
    if self._step_fn is None or self._task_id != id(task):
      k = min(TOPK, len(self.source.classnames))

      def step(params, mutables, images, labels, valid):
        logits = task.logits(params, mutables, images).astype(jnp.float32)
        label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
        rank = jnp.sum(logits >= label_logit, axis=1) - 1
        count = lambda hit: jnp.sum(hit & valid, dtype=jnp.int32)
        return count(rank < 1), count(rank < k), jnp.sum(valid, dtype=jnp.int32)

      image_spec, vector_spec = self._specs()
      replicated = jax.sharding.PartitionSpec()
      self._step_fn = self.partitioner.partition(
          step,
          in_axis_resources=(evaluate.params_mesh_axes(task, self.partitioner),
                             mutables_mesh_axes(task, self.partitioner), image_spec,
                             vector_spec, vector_spec),
          out_axis_resources=(replicated,) * 3)
      self._task_id = id(task)
    return self._step_fn

  def local_batches(self, image_size: int) -> Iterator[Dict[str, np.ndarray]]:
    """This process's shard, padded with invalid examples to the common number of batches."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    partitioner = self.partitioner
    if self.batch_size % partitioner.data_mesh_size:
      raise evaluate.EvalError(f"config.data.eval_batch_size {self.batch_size} is not divisible "
                               f"by the data-parallel size {partitioner.data_mesh_size}")
    layout = partitioner.get_data_layout(self.batch_size)
    local_batch = self.batch_size // layout.num_shards
    per_shard = int(math.ceil(self.source.num_examples / layout.num_shards))
    num_batches = int(math.ceil(per_shard / local_batch))
    crop = {} if self.crop_fraction is None else {"crop_fraction": self.crop_fraction}
    ds = self.source.dataset(layout.shard_id, layout.num_shards, image_size, **crop)
    ds = ds.map(lambda ex: dict(ex, valid=tf.constant(True)))
    pad = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()}
    pad["valid"] = tf.constant(False)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  def evaluate(self, task: Any, params: Any, flax_mutables: Mapping[str, Any]) -> Metrics:
    step = self._compiled_step(task)
    mesh = self.partitioner.mesh
    image_spec, vector_spec = self._specs()
    to_global = lambda array, spec: jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, spec), np.asarray(array))
    params = flax.core.unfreeze(params)
    mutables = flax.core.unfreeze(flax_mutables)
    num_classes = len(self.source.classnames)
    counts = []
    for batch in self.local_batches(task.image_size):
      labels = batch["label"].astype(np.int32)
      bad = labels[batch["valid"] & ((labels < 0) | (labels >= num_classes))]
      if bad.size:
        raise evaluate.EvalError(f"evaluation data {self.source.name!r} has label {int(bad[0])} "
                                 f"outside [0, {num_classes})")
      counts.append(step(params, mutables, to_global(batch["image"], image_spec),
                         to_global(labels, vector_spec), to_global(batch["valid"], vector_spec)))
    top1, topk, counted = np.sum(np.asarray(jax.device_get(counts), np.int64), axis=0)
    if counted != self.source.num_examples:
      raise evaluate.EvalError(f"evaluation data {self.source.name!r}: counted {counted} images "
                               f"but the source holds {self.source.num_examples}")
    prefix = f"classification/{self.source.name}"
    return {f"{prefix}/top1": float(top1) / counted, f"{prefix}/top{TOPK}": float(topk) / counted,
            f"{prefix}/num_images": float(counted)}

  def __call__(self, task: Any, state: Any, step: int) -> Metrics:
    metrics = self.evaluate(task, state.params, state.flax_mutables)
    if jax.process_index() == 0:
      print(f"eval at step {step}: {evaluate.format_metrics(metrics)}", flush=True)
    return metrics


def run_eval_only(config: ml_collections.ConfigDict, workdir: str, task: Any = None) -> Metrics:
  """Evaluates a classifier checkpoint (`config.pretrain_dir`, else the newest in workdir).

  A missing or misfitting checkpoint raises `checkpoints.CheckpointError`, unusable data
  `flip.evaluate.EvalError`; both are one line naming the path or data set.
  """
  from flip import train  # pylint: disable=g-import-not-at-top
  ckpt_dir = evaluate.eval_checkpoint_dir(config, workdir)
  hook = ClassificationEval.from_config(config)
  if hook is None:
    raise evaluate.EvalError("nothing to evaluate: config.data.eval is empty")
  task = task or train.build_task(config)
  variables = flax.core.unfreeze(jax.eval_shape(task.init_variables, jax.random.PRNGKey(0)))
  contents = jax.tree.map(np.asarray, _load_state(ckpt_dir))
  params = checkpoints.match_params(contents.get("target", {}), variables["params"],
                                    source=ckpt_dir)
  mutable_shapes = {k: v for k, v in variables.items()
                    if k != "params" and not k.endswith("_axes")}
  mutables = checkpoints.match_params(contents.get("flax_mutables", {}), mutable_shapes,
                                      source=ckpt_dir) if mutable_shapes else {}
  partitioner = hook.partitioner
  metrics = hook.evaluate(
      task, place_host_tree(params, evaluate.params_mesh_axes(task, partitioner), partitioner),
      place_host_tree(mutables, mutables_mesh_axes(task, partitioner), partitioner))
  evaluate.report_eval_only(workdir, ckpt_dir, metrics)
  return metrics


def _load_state(ckpt_dir: str) -> Dict[str, Any]:
  from t5x import checkpoints as t5x_checkpoints  # pylint: disable=g-import-not-at-top
  return t5x_checkpoints.load_t5x_checkpoint(ckpt_dir)


def place_host_tree(tree: Mapping[str, Any], specs: Mapping[str, Any], partitioner: Any) -> Any:
  """Host arrays every process holds in full -> global arrays with the given PartitionSpecs."""
  mesh = partitioner.mesh
  return jax.tree.map(
      lambda x, spec: jax.make_array_from_callback(
          np.shape(x), jax.sharding.NamedSharding(mesh, spec), lambda index: np.asarray(x)[index]),
      flax.core.unfreeze(tree), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
