"""The one training loop: every task (FLIP now, the MAE family later) runs through it.

Owns: the partitioner (`flip.partitioning`, t5x's PjitPartitioner), the train state
(`t5x.train_state.FlaxOptimTrainState` with the optax chain in `t5x.optimizers.OptaxWrapper`),
init or restore (workdir / `config.resume_dir`, else `config.pretrain_dir` params into a fresh
optimizer state), the partitioned train step with the state donated, per-step randomness from
(seed, step) so a run is reproducible and a resumed run is identical, metrics (clu writers:
tensorboard + console), periodic checkpoints with the input iterator beside them, eval hooks, and a
clean exit on SIGTERM/SIGINT with a final checkpoint.

Numeric faults: a step whose loss or gradient is not finite leaves the parameters and optimizer
state unchanged (the update is discarded on device; only the step counter advances, so the
state's step, which names checkpoints, stays the loop's step), is counted and logged, and
`config.max_consecutive_nonfinite` of them in a row stop the run with an error; checkpoints are
checked for non-finite values before they are written.

Progress is measured in samples, not steps: `samples_seen` is saved with every checkpoint so a run
resumed with another batch size or `num_epochs` continues its schedule at the right virtual epoch
(flip.optim); the run ends when `num_epochs` worth of samples are seen (or after
`config.num_train_steps` steps when that is set). With another batch size the input pipeline
starts afresh: t5x's saved tf.data iterator state is the old pipeline, old batch size included.
"""

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from absl import logging
from clu import metric_writers
import flax
from flax.linen import partitioning as nn_partitioning
import gin
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from t5x import checkpoints as t5x_checkpoints
from t5x import optimizers as t5x_optimizers
from t5x import train_state as t5x_train_state

from flip import checkpoints
from flip import optim
from flip import partitioning
from flip import tasks as tasks_lib

EvalHook = Callable[[Any, Any, int], Mapping[str, float]]


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class Progress:
  """Where a run is: optimizer step and samples consumed (for the schedule in virtual epochs)."""
  step: int = 0
  samples_seen: float = 0.0


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then checkpoints, exits)."""

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self._previous = {}
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: checkpointing and stopping after this step", signum)
    self.requested = True

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@gin.configurable(denylist=["partitioning_config"])
def build_partitioner(partitioning_config: Any,
                      partitioner_cls: Any = partitioning.FlipPjitPartitioner):
  """`config.partitioning` -> partitioner; `partitioner_cls` can be rebound in gin."""
  return partitioning.make_partitioner(partitioning_config, partitioner_cls)


@gin.configurable(denylist=["config"])
def build_task(config: Any, task_name: str = "flip"):
  return tasks_lib.get_task(config, task_name)


def _batch_mesh_axes(task, partitioner) -> Dict[str, Any]:
  return {k: nn_partitioning.logical_to_mesh_axes(v, partitioner.logical_axis_rules)
          for k, v in task.batch_logical_axes().items()}


class Trainer:
  """Builds the partitioned state and step for a task; the loop is `train_and_evaluate`."""

  def __init__(self, config: ml_collections.ConfigDict, task, partitioner,
               progress: Progress):
    self.config = config
    self.task = task
    self.partitioner = partitioner
    self.accum_steps = config.grad_accum_steps
    start_step, start_epoch = progress.step, progress.samples_seen / config.samples_per_epoch
    if progress.samples_seen == progress.step * config.batch_size:
      # Same batch size all along: the schedule anchored at step 0 is the same function, and
      # using it keeps a resumed run bitwise equal to an uninterrupted one (an anchor at the
      # resume step rounds the float32 epoch position differently by one ulp).
      start_step, start_epoch = 0, 0.0
    self.tx = optim.make_optimizer(config, start_step=start_step, start_epoch=start_epoch)
    # One optimizer definition: it is static metadata of the train-state pytree, so every state
    # (initialised, restored, partitioned) must share this very object.
    self.optimizer_def = t5x_optimizers.OptaxWrapper(self.tx)
    self._init_rng = jax.random.PRNGKey(config.seed_jax)
    self.state_shape = jax.eval_shape(self._init_state, self._init_rng)
    self.state_axes = partitioner.get_mesh_axes(self.state_shape)
    self.batch_axes = _batch_mesh_axes(task, partitioner)
    data_layout = partitioner.get_data_layout(config.batch_size)
    self.data_layout = data_layout
    self._p_init = partitioner.partition(self._init_state, in_axis_resources=None,
                                         out_axis_resources=self.state_axes)
    self._p_train_step = partitioner.partition(
        self._train_step, in_axis_resources=(self.state_axes, self.batch_axes),
        out_axis_resources=(self.state_axes, None), donate_argnums=(0,))

  def _init_state(self, rng):
    variables = self.task.init_variables(rng)
    return t5x_train_state.FlaxOptimTrainState.create(self.optimizer_def, variables)

  def init_state(self):
    return self._p_init(self._init_rng)

  def _train_step(self, state, batch):
    base = jax.random.PRNGKey(self.config.seed_jax)
    rng = jax.random.fold_in(jax.random.fold_in(base, 1), state.step)
    loss, metrics, grads = self.task.compute_grads(state.params, batch, rng, self.accum_steps)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradient(grads, learning_rate=None)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace_step(state.step + 1)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   nonfinite=jnp.logical_not(finite).astype(jnp.int32))
    return new_state, metrics

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over the data axis."""
    mesh = self.partitioner.mesh
    out = {}
    for key, axes in self.batch_axes.items():
      sharding = jax.sharding.NamedSharding(mesh, axes)
      out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key]))
    return out

  def train_step(self, state, batch):
    return self._p_train_step(state, self.global_batch(batch))

  def replace_params(self, state, params):
    """Puts `params` into `state` with the state's sharding (fresh optimizer state kept)."""
    params = flax.core.freeze(params)
    p_replace = self.partitioner.partition(
        lambda s, p: s.replace_params(p),
        in_axis_resources=(self.state_axes, self.state_axes.params),
        out_axis_resources=self.state_axes, donate_argnums=(0,))
    return p_replace(state, params)


def total_samples(config) -> float:
  return float(config.num_epochs) * float(config.samples_per_epoch)


def checkpoint_interval_steps(config) -> int:
  if config.checkpoint_every_steps > 0:
    return int(config.checkpoint_every_steps)
  return max(1, int(round(config.save_every_epochs * config.samples_per_epoch / config.batch_size)))


def eval_interval_steps(config) -> int:
  if config.eval_every_epochs <= 0:
    return 0
  return max(1, int(round(config.eval_every_epochs * config.samples_per_epoch / config.batch_size)))


def _restore_dir(config, workdir: str) -> str:
  """Resume from `config.resume_dir` when it is set and holds a checkpoint, else from workdir."""
  if config.resume_dir and checkpoints.latest_complete_step(config.resume_dir) is not None:
    return config.resume_dir
  return workdir


def _host_metrics(metrics_list: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
  fetched = jax.device_get(list(metrics_list))
  summary = {}
  for key in fetched[0]:
    values = np.asarray([m[key] for m in fetched], dtype=np.float64)
    summary[key] = float(values.sum() if key == "nonfinite" else values.mean())
  return summary


def _format_console(step: int, total: int, scalars: Mapping[str, float]) -> str:
  shown = ["loss", "lr", "logit_scale", "grad_norm", "steps_per_sec", "images_per_sec"]
  parts = [f"step {step}/{total}"]
  for key in shown:
    if key in scalars:
      parts.append(f"{key} {scalars[key]:.4g}")
  if "eta_min" in scalars:
    parts.append(f"eta {scalars['eta_min']:.1f} min")
  skipped = {k: v for k, v in scalars.items() if k.startswith("data/skipped/") and v}
  if skipped:
    parts.append("skipped " + ", ".join(f"{k.split('/')[-1]}={int(v)}" for k, v in skipped.items()))
  return " | ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       eval_hooks: Sequence[EvalHook] = (),
                       make_dataset: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there); returns final metrics.

  `make_dataset(config, shard_index, num_shards, seed)` defaults to the task's training data.
  `eval_hooks(task, state, step)` run every `config.eval_every_epochs` and at the end; their
  scalars are logged.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  task = build_task(config)
  partitioner = build_partitioner(config.partitioning)
  if config.batch_size % partitioner.data_mesh_size:
    raise ValueError(f"config.batch_size {config.batch_size} is not divisible by the data-parallel "
                     f"size {partitioner.data_mesh_size}")
  restore_dir = _restore_dir(config, workdir)
  restore_step = checkpoints.latest_complete_step(restore_dir)
  progress = Progress()
  # The saved tf.data iterator state holds the whole pipeline, batch size included: restored
  # into a run with another batch size it would keep yielding the old shape.
  restore_data_position = True
  if restore_step is not None:
    meta = checkpoints.read_meta(restore_dir, restore_step) or {}
    progress = Progress(step=restore_step,
                        samples_seen=float(meta.get("samples_seen",
                                                    restore_step * config.batch_size)))
    saved_batch_size = meta.get("batch_size", config.batch_size)
    if saved_batch_size != config.batch_size:
      restore_data_position = False
      logging.warning("config.batch_size changed from %d to %d since the checkpoint: the input "
                      "pipeline starts afresh (its saved position is for the old batch size)",
                      saved_batch_size, config.batch_size)
  trainer = Trainer(config, task, partitioner, progress)
  layout = trainer.data_layout
  make_dataset = make_dataset or task.train_dataset
  dataset = make_dataset(config, layout.shard_id, layout.num_shards, config.seed_tf)
  data_iter = iter(dataset)
  checkpointer = t5x_checkpoints.Checkpointer(
      trainer.state_shape, partitioner, workdir, dataset_iterator=data_iter,
      keep=config.keep_checkpoints, keep_dataset_checkpoints=config.keep_checkpoints)

  if restore_step is not None:
    logging.info("resuming from %s at step %d (%.0f samples seen)",
                 checkpoints.checkpoint_dir(restore_dir, restore_step), progress.step,
                 progress.samples_seen)
    restorer = checkpointer
    if restore_dir != workdir or not restore_data_position:
      restorer = t5x_checkpoints.Checkpointer(
          trainer.state_shape, partitioner, restore_dir,
          dataset_iterator=data_iter if restore_data_position else None)
    state = restorer.restore(path=checkpoints.checkpoint_dir(restore_dir, restore_step))
  else:
    state = trainer.init_state()
    if config.pretrain_dir:
      params = checkpoints.load_pretrained_params(
          config.pretrain_dir, trainer.state_shape.params, posemb_grid=task_posemb_grid(task))
      state = trainer.replace_params(state, params)
      logging.info("loaded pretrained parameters from %s", config.pretrain_dir)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if restore_step is None:
    writer.write_hparams(_flat_hparams(config))

  if config.num_train_steps > 0:
    last_step = int(config.num_train_steps)
  else:
    remaining = max(0.0, total_samples(config) - progress.samples_seen)
    last_step = progress.step + int(math.ceil(remaining / config.batch_size))
  ckpt_every = checkpoint_interval_steps(config)
  eval_every = eval_interval_steps(config)
  log_every = max(1, int(config.log_every_steps))

  def save(state, step_progress: Progress):
    if checkpoints.latest_complete_step(workdir) == int(step_progress.step):
      return
    checkpoints.check_finite(state.params, f"step {step_progress.step}")
    checkpoints.write_meta(workdir, int(step_progress.step), {
        "step": int(step_progress.step), "samples_seen": step_progress.samples_seen,
        "batch_size": config.batch_size, "config": config.to_json_best_effort()})
    checkpointer.save(state)
    checkpoints.prune_meta(workdir)

  def run_evals(state, step) -> Dict[str, float]:
    scalars = {}
    for hook in eval_hooks:
      scalars.update(hook(task, state, step))
    if scalars:  # the hooks print their own results
      writer.write_scalars(step, scalars)
    return {k: float(v) for k, v in scalars.items()}

  watcher = PreemptionWatcher()
  pending_metrics, consecutive_nonfinite, nonfinite_total = [], 0, 0
  last_scalars: Dict[str, float] = {}
  step = progress.step
  t_log, step_log = time.time(), step
  t_start = time.time()
  skipped_now: Dict[str, float] = {}
  try:
    while step < last_step and not watcher.requested:
      batch = dict(next(data_iter))
      skipped_now = {k: float(np.asarray(v)) for k, v in batch.pop("skipped", {}).items()}
      batch = {k: np.asarray(v) for k, v in batch.items()}
      state, metrics = trainer.train_step(state, batch)
      step += 1
      progress = Progress(step=step, samples_seen=progress.samples_seen + config.batch_size)
      pending_metrics.append(metrics)

      if step % log_every == 0 or step == last_step:
        scalars = _host_metrics(pending_metrics)
        nonfinite_now = int(scalars.pop("nonfinite"))
        nonfinite_total += nonfinite_now
        consecutive_nonfinite = (consecutive_nonfinite + nonfinite_now
                                 if nonfinite_now == len(pending_metrics) else nonfinite_now)
        pending_metrics = []
        elapsed = time.time() - t_log
        steps_per_sec = (step - step_log) / max(elapsed, 1e-9)
        t_log, step_log = time.time(), step
        scalars.update({
            "lr": lr_at(config, progress),
            "epoch": progress.samples_seen / config.samples_per_epoch,
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * config.batch_size,
            "eta_min": (last_step - step) / max(steps_per_sec, 1e-9) / 60.0,
            "nonfinite_steps_total": nonfinite_total,
        })
        scalars.update({f"data/skipped/{k}": v for k, v in skipped_now.items()})
        writer.write_scalars(step, scalars)
        print(_format_console(step, last_step, scalars), flush=True)
        last_scalars = scalars
        if consecutive_nonfinite >= config.max_consecutive_nonfinite:
          raise NonFiniteError(
              f"{consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
              f"(limit config.max_consecutive_nonfinite={config.max_consecutive_nonfinite}); "
              f"last good checkpoint: {checkpoints.latest_complete_step(workdir)}")

      if step % ckpt_every == 0:
        save(state, progress)
      if eval_every and step % eval_every == 0 and step != last_step:
        last_scalars.update(run_evals(state, step))
    save(state, progress)
    if step >= last_step:
      last_scalars.update(run_evals(state, step))
  finally:
    watcher.restore()
    writer.flush()
  logging.info("stopped at step %d after %.1f s%s", step, time.time() - t_start,
               " (preempted)" if watcher.requested else "")
  return {"step": step, "state": state, "metrics": last_scalars, "preempted": watcher.requested,
          "workdir": workdir}


def lr_at(config, progress: Progress) -> float:
  """The learning rate used for the step that just finished (host-side, for logging)."""
  epoch = (progress.samples_seen - config.batch_size) / config.samples_per_epoch
  return float(optim.epoch_schedule(config)(max(epoch, 0.0)))


def task_posemb_grid(task):
  size = task.image_size
  patch = tuple(task.config.model.model_img.patches.size)
  return size // patch[0], size // patch[1]


def _flat_hparams(config) -> Dict[str, Any]:
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        flat[name] = value
      else:
        flat[name] = str(value)
  visit("", config)
  return flat
