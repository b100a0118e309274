"""Top-1/top-5 accuracy of a classifier task (linear probe, fine-tuning) on a held-out split
(evaluator type "classification").

The data (`dataset`) is a labelled data set in one of the forms `flip.data.classification`
accepts: a tfds name (its validation split), an image folder (`folder:<dir>` or a directory, one
sub-folder per class), or `demo:<dir>` (the demo's test split); it must have
`config.data.num_classes` classes. Images get the evaluation resize + centre crop
(`config.aug.eval_crop_fraction`). The task's `logits` run with the train state's parameters and
BatchNorm statistics under the partitioner (images, labels and a validity mask sharded over the
data axis like training batches; parameters and statistics keep the train state's sharding, the
context's axes), and hits are counted on device with the tie rule of `flip.evals.core.
topk_counts` (ties count against the model), k capped by the number of classes. Padding and the
count check are those of `flip.evals.core.ShardedEval`.

Metrics: `classification/<set>/top1`, `.../top5` (fractions) and `.../num_images`.
"""

from typing import Any, Dict, Mapping

import flax
import jax.numpy as jnp

from flip.evals import core
from flip.evals import registry

Metrics = Dict[str, float]


@registry.register_evaluator("classification")
class ClassificationEvaluator(registry.Evaluator):
  """Held-out top-1/top-5 of a classifier task."""

  requires = frozenset({registry.Capability.CLASSIFIES})
  defaults = {"max_images": 0}  # evaluate only the first N images; 0 = all

  def __init__(self, name: str, settings: Mapping[str, Any], context: registry.EvalContext):
    super().__init__(name, settings, context)
    from flip.data import classification  # pylint: disable=g-import-not-at-top (tf)
    s = self.settings
    config = context.config
    dataset_key = f"{self.key}.dataset"
    try:
      self.source = classification.labelled_source(s["dataset"], classification.EVAL,
                                                   int(s["max_images"]), key=dataset_key)
      classification.check_num_classes(self.source, config.data.num_classes, dataset_key)
    except classification.ClassificationDataError as err:
      raise core.EvalError(str(err)) from None
    self.sharded = core.ShardedEval(context.partitioner, int(s["batch_size"]),
                                    context.task.image_size, config.aug.get("eval_crop_fraction"),
                                    key=f"{self.key}.batch_size")
    self._step_fn = None

  def _compiled_step(self):
    if self._step_fn is None:
      task, sharded = self.context.task, self.sharded
      k = min(core.TOPK, len(self.source.classnames))

      def step(params, mutables, images, labels, valid):
        logits = task.logits(params, mutables, images).astype(jnp.float32)
        return core.topk_counts(logits, labels, valid, k)

      self._step_fn = sharded.partitioner.partition(
          step, in_axis_resources=(self.context.params_axes, self.context.mutables_axes,
                                   sharded.image_spec, sharded.vector_spec, sharded.vector_spec),
          out_axis_resources=(sharded.replicated,) * 3)
    return self._step_fn

  def evaluate(self, params: Any, flax_mutables: Any, step: int) -> Metrics:
    del step
    compiled = self._compiled_step()
    params = flax.core.unfreeze(params)
    mutables = flax.core.unfreeze(flax_mutables)
    return self.sharded.topk_accuracy(
        self.source, f"classification/{self.source.name}",
        lambda images, labels, valid: compiled(params, mutables, images, labels, valid))
