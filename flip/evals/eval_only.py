"""`config.eval_only`: restore a checkpoint, then run `config.evals`.

The checkpoint is `config.pretrain_dir` if set, else the newest complete checkpoint of the workdir
(`flip.builders.eval_checkpoint_dir`). Its parameters and other collections (BatchNorm statistics)
are fitted to the task's model and placed with the training sharding (`flip.builders.
load_eval_variables`); every enabled entry of `config.evals` is built against the same context the
trainer would build and evaluated once at the checkpoint's step: zero-shot and retrieval for FLIP,
held-out top-1/top-5 for a linear probe or a fine-tuned classifier, the reconstruction grid and
held-out loss for MAE. The data are resolved before any parameter is read. `config.laion_path`
(the training data) is never read.

The result is written into the workdir's tensorboard events at the checkpoint's step (the
reconstruction grid too) and printed as one `eval_only <checkpoint>: ...` line by process 0.
Problems are one line: a missing checkpoint `flip.checkpoints.CheckpointError`, nothing enabled or
a bad entry `EvalConfigError`, unusable data `EvalError`.
"""

from typing import Any, Dict

import jax
import ml_collections

from flip import builders
from flip.evals import core
from flip.evals import registry

Metrics = Dict[str, float]


def make_context(config: ml_collections.ConfigDict, task: Any, partitioner: Any, workdir: str,
                 writer: Any = None) -> registry.EvalContext:
  """The context of a task and partitioner, with the axes the trainer's state uses."""
  return registry.EvalContext(
      config=config, task=task, partitioner=partitioner,
      params_axes=builders.params_mesh_axes(task, partitioner),
      mutables_axes=builders.mutables_mesh_axes(task, partitioner), workdir=workdir,
      writer=writer)


def run_eval_only(config: ml_collections.ConfigDict, workdir: str) -> Metrics:
  """Evaluates a checkpoint with every enabled entry of `config.evals`; prints, writes and
  returns the metrics (see the module docstring)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  ckpt_dir = builders.eval_checkpoint_dir(config, workdir)
  if not registry.enabled_names(config):
    names = ", ".join(f"{registry.EVALS_KEY}.{name}.dataset"
                      for name in registry.entries(config)) or registry.EVALS_KEY
    raise core.EvalConfigError(f"config.eval_only=True but nothing to evaluate: {names} "
                               f"{'is' if ',' not in names else 'are all'} empty")
  task = builders.build_task(config)
  partitioner = builders.checked_partitioner(config)
  context = make_context(config, task, partitioner, workdir)
  evaluators = registry.build_evaluators(config, context)
  params, mutables = builders.load_eval_variables(ckpt_dir, task, partitioner)
  # The workdir's event file is created only once everything has been checked and loaded.
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  context.writer = writer
  step = core.checkpoint_step(ckpt_dir)
  metrics: Metrics = {}
  for evaluator in evaluators:
    metrics.update(evaluator.evaluate(params, mutables, step))
  core.report_eval_only(writer, ckpt_dir, metrics)
  return metrics
