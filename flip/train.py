"""The one training loop: every task (FLIP now, the MAE family later) runs through it.

Owns: the partitioner (`flip.partitioning`, t5x's PjitPartitioner), the train state
(`t5x.train_state.FlaxOptimTrainState` with the optax chain in `t5x.optimizers.OptaxWrapper`),
init or restore (the workdir's newest checkpoint, else `config.resume_dir`'s, else
`config.pretrain_dir` params into a fresh optimizer state), the partitioned train step with the
state donated, per-step randomness from (seed, step) so a run is reproducible and a resumed run
is identical, metrics (clu writers: tensorboard + console), periodic checkpoints with the input
iterator beside them, eval hooks, and a clean exit on SIGTERM/SIGINT with a final checkpoint (in
a multi-process run the processes agree on the step to stop at; `train_and_evaluate` reports the
signal, main.py exits with 128 + signal). The processes of a multi-process run meet after the
checks below and before restore or compute, and open their collectives together
(`align_processes`).

Checks before any compute, each a one-line `flip.config.ConfigError`: the workdir is writable,
the partitioner's mesh fits the devices, the batch divides over the data-parallel size, the
training data can be listed (the task's dataset is built before anything is compiled), and
`config.pretrain_dir` fits the model (shapes checked against `jax.eval_shape` of the init).

Numeric faults: a step whose loss, gradient or updated state is not finite leaves the parameters
and optimizer state unchanged (the update is discarded on device; only the step counter advances,
so the state's step, which names checkpoints, stays the loop's step), is counted and logged, and
`config.max_consecutive_nonfinite` of them in a row stop the run with `NonFiniteError`. The
learning-rate schedule is indexed by the train state's step: every optax schedule counter
(`ScaleByScheduleState`) is set to it before each update, so the lr applied on device is the
logged one after skipped steps, while a skipped step still leaves the whole optimizer state
bitwise unchanged (Adam's own count, which drives its bias correction, counts only the updates
its moments have seen). Before a checkpoint is written
the whole state (parameters, optimizer moments, mutables) is checked for non-finite values.

Crashes: a checkpoint becomes visible only when complete (flip.checkpoints), so a run killed at
any point resumes from the last complete one; the tensorboard events are flushed before every
checkpoint, so every logged step up to it is on disk. A checkpoint that cannot be written (disk
full, permissions) stops the run with `flip.checkpoints.CheckpointWriteError`; the previous ones
are intact. A checkpoint whose input-iterator state is not for this run's data layout (written by
a run with another number of processes) restores the train state and restarts the input pipeline,
as a changed batch size does; a restarted pipeline is seeded with `config.seed_tf + step`, so it
does not replay the first batches the run already saw.

Data skip counts (`data/skipped/<reason>`: cumulative since the start of training, part of the
saved iterator state) are logged at every log step, summed over the data shards of a
multi-process run (each process's pipeline counts only the records it read).

Progress is measured in samples, not steps: `samples_seen` is saved with every checkpoint so a run
resumed with another batch size or `num_epochs` continues its schedule at the right virtual epoch
(flip.optim); the run ends when `num_epochs` worth of samples are seen (or after
`config.num_train_steps` steps when that is set). With another batch size the input pipeline
starts afresh: t5x's saved tf.data iterator state is the old pipeline, old batch size included.
"""

import dataclasses
import itertools
import math
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from absl import logging
from clu import metric_writers
import flax
from flax import traverse_util
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
from flip import config as config_lib
from flip import optim
from flip import partitioning
from flip import tasks as tasks_lib

EvalHook = Callable[[Any, Any, int], Mapping[str, float]]

# How long the processes of a multi-process run wait for each other before the first step
# (start-up, data listing and restore take what they take; this only bounds a process that never
# comes).
PROCESS_START_BARRIER_SECONDS = 3600
_TRAIN_STARTS = itertools.count()  # barrier names: every process counts its runs alike


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
    self.signal_number: Optional[int] = None
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
    self.signal_number = self.signal_number or signum

  def stop_agreed(self) -> bool:
    """Whether any process was asked to stop. Every process calls this once per step, so all of
    them leave the loop after the same step (a process that stopped alone would wait forever in
    the checkpoint's collective writes)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    signals = multihost_utils.process_allgather(np.int32(self.signal_number or 0))
    received = [int(s) for s in np.ravel(signals) if s]
    if received and not self.requested:
      self.requested, self.signal_number = True, received[0]
      logging.warning("another process received signal %d: checkpointing and stopping",
                      received[0])
    return bool(received)

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@gin.configurable(denylist=["partitioning_config"])
def build_partitioner(partitioning_config: Any,
                      partitioner_cls: Any = partitioning.FlipPjitPartitioner):
  """`config.partitioning` -> partitioner; `partitioner_cls` can be rebound in gin."""
  return partitioning.make_partitioner(partitioning_config, partitioner_cls)


@gin.configurable(denylist=["config"])
def build_task(config: Any, task_name: Optional[str] = None):
  """The task named by the gin binding `train.build_task.task_name` or else by `config.task`
  (default "flip"); a binding that disagrees with `config.task` is refused."""
  configured = config.get("task")
  if task_name is not None and configured is not None and task_name != configured:
    raise config_lib.ConfigError(
        f"gin binds train.build_task.task_name={task_name!r} but config.task={configured!r}")
  return tasks_lib.get_task(config, task_name or configured or tasks_lib.DEFAULT_TASK)


def align_processes(mesh: jax.sharding.Mesh, name: str) -> None:
  """Multi-process runs: meet at a barrier, then open the collectives of the mesh together.

  XLA's CPU collectives (gloo) connect the processes of a group of devices the first time a
  program uses that group, and wait at most 30 s (fixed in XLA) for the others: a process that
  starts, restores or compiles the train step more than 30 s after another fails its first step
  with "Gloo context initialization failed: DEADLINE_EXCEEDED" (seen with 2 processes on a loaded
  2-core machine). Here all processes meet at a barrier of jax's coordination service (no such
  limit), then psum over every group the train step can use (all devices, and each mesh axis)
  while they are together, and all-gather across processes as `multihost_utils` does (the loop's
  stop agreement, checkpointing); later collectives wait for a late peer instead of failing.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top (jax's own barrier client)
  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, PROCESS_START_BARRIER_SECONDS * 1000)
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  ones = jax.make_array_from_callback(
      (mesh.size,), jax.sharding.NamedSharding(mesh, spec), lambda _: np.ones((1,), np.int32))
  groups = [tuple(mesh.axis_names)] + [(a,) for a in mesh.axis_names
                                       if 1 < mesh.shape[a] < mesh.size]
  for axes in groups:
    summed = jax.jit(jax.shard_map(lambda x, axes=axes: jax.lax.psum(x, axes), mesh=mesh,
                                   in_specs=spec, out_specs=spec))(ones)
    expected = math.prod(mesh.shape[a] for a in axes)
    if any(int(np.asarray(shard.data)[0]) != expected for shard in summed.addressable_shards):
      raise RuntimeError(f"collective check over mesh axes {axes} failed")
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.int32(jax.process_index()))
  if sorted(int(i) for i in np.ravel(gathered)) != list(range(jax.process_count())):
    raise RuntimeError(f"process all-gather check failed: {gathered}")


def _is_schedule_state(node: Any) -> bool:
  return isinstance(node, optax.ScaleByScheduleState)


def index_schedules_by_step(state):
  """`state` with every optax schedule counter set to the train state's step."""

  def index(node):
    if _is_schedule_state(node):
      return optax.ScaleByScheduleState(count=jnp.asarray(state.step, node.count.dtype))
    return node

  return jax.tree.map(index, state, is_leaf=_is_schedule_state)


def _all_finite(tree) -> jax.Array:
  """True if no floating leaf of `tree` holds an inf or a NaN.

  x * 0 is 0 for every finite x and NaN for inf and NaN, so each leaf's sum of x * 0 is 0 or NaN
  (it cannot overflow, unlike a sum of x): one fused multiply-reduce per leaf, where
  `all(isfinite(x))` makes XLA's CPU backend write a boolean array and reduce it in two passes.
  """
  probes = [jnp.sum(leaf * 0, dtype=jnp.float32) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.isfinite(jnp.sum(jnp.stack(probes))) if probes else jnp.asarray(True)


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
    # A task may build its own chain (frozen parameters, per-parameter lr multipliers).
    make_optimizer = getattr(task, "make_optimizer", optim.make_optimizer)
    self.tx = make_optimizer(config, start_step=start_step, start_epoch=start_epoch)
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
    state = t5x_train_state.FlaxOptimTrainState.create(self.optimizer_def, variables)
    # A strongly typed step, as a restored one is: fresh and resumed runs then share one compiled
    # train step (a weakly typed step is another program, compiled again by every restart).
    return state.replace_step(jnp.asarray(state.step, jnp.int32))

  def init_state(self):
    return self._p_init(self._init_rng)

  def _train_step(self, state, batch):
    base = jax.random.PRNGKey(self.config.seed_jax)
    rng = jax.random.fold_in(jax.random.fold_in(base, 1), state.step)
    if getattr(self.task, "uses_flax_mutables", False):
      # Tasks with non-parameter collections (BatchNorm statistics) update them every step.
      loss, metrics, grads, mutables = self.task.compute_grads(
          state.params, batch, rng, self.accum_steps, flax_mutables=state.flax_mutables)
    else:
      loss, metrics, grads = self.task.compute_grads(state.params, batch, rng, self.accum_steps)
      mutables = state.flax_mutables
    grad_norm = optax.global_norm(grads)
    state = index_schedules_by_step(state)
    new_state = state.apply_gradient(grads, learning_rate=None, flax_mutables=mutables)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_state)
    # A conditional, not a select per leaf: XLA fuses the scalar `finite` (a chain over every
    # leaf's probe) into each consumer, so a select per leaf copies the whole chain into every
    # leaf's fusion: quadratic in the number of leaves (the side-by-side model's step took 200 s
    # and 7.6 GB to compile; 20 s and 4.3 GB this way). A conditional evaluates `finite` once.
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
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

  def merge_params(self, state, partial_params):
    """Like `replace_params` for a subset of the parameters (e.g. a pretrained encoder under a
    fresh head): the keys of `partial_params` are replaced, every other parameter is kept."""
    flat_new = traverse_util.flatten_dict(flax.core.unfreeze(partial_params), sep="/")
    flat_axes = traverse_util.flatten_dict(flax.core.unfreeze(self.state_axes.params), sep="/")
    unknown = sorted(set(flat_new) - set(flat_axes))
    if unknown:
      raise checkpoints.CheckpointError(f"pretrained parameters the model does not have: "
                                        f"{', '.join(unknown[:3])}")

    def merge(s, new):
      flat = traverse_util.flatten_dict(flax.core.unfreeze(s.params), sep="/")
      flat.update(new)
      return s.replace_params(flax.core.freeze(traverse_util.unflatten_dict(flat, sep="/")))

    p_merge = self.partitioner.partition(
        merge, in_axis_resources=(self.state_axes, {k: flat_axes[k] for k in flat_new}),
        out_axis_resources=self.state_axes, donate_argnums=(0,))
    return p_merge(state, flat_new)


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
  """The workdir when it holds a checkpoint (a preempted run restarted with the same command line
  continues its own progress), else `config.resume_dir` when set, else the workdir (fresh)."""
  if checkpoints.latest_complete_step(workdir) is not None:
    return workdir
  if config.resume_dir and checkpoints.latest_complete_step(config.resume_dir) is not None:
    return config.resume_dir
  return workdir


def _checked_partitioner(config):
  """The partitioner, with its mesh built and the batch checked against it, or a ConfigError."""
  try:
    partitioner = build_partitioner(config.partitioning)
    mesh = partitioner.mesh
  except ValueError as err:
    # gin appends "In call to configurable ..." lines to exceptions raised under it.
    raise config_lib.ConfigError(str(err).splitlines()[0]) from None
  data_size = partitioner.data_mesh_size
  if config.batch_size % data_size:
    raise config_lib.ConfigError(
        f"config.batch_size {config.batch_size} is not divisible by the data-parallel size "
        f"{data_size} (mesh {dict(mesh.shape)} on {len(jax.devices())} devices)")
  return partitioner


def _load_pretrained(config, task, trainer):
  """`config.pretrain_dir`'s parameters fitted to the model (no compute), or a ConfigError."""
  try:
    if hasattr(task, "load_pretrained_params"):
      # The task picks what to load (e.g. only the image encoder, under a fresh head).
      return task.load_pretrained_params(config.pretrain_dir, trainer.state_shape.params)
    return checkpoints.load_pretrained_params(
        config.pretrain_dir, trainer.state_shape.params, posemb_grid=task_posemb_grid(task))
  except checkpoints.CheckpointError as err:
    raise config_lib.ConfigError(f"config.pretrain_dir: {err}") from None


def _host_metrics(metrics_list: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
  fetched = jax.device_get(list(metrics_list))
  summary = {}
  for key in fetched[0]:
    values = np.asarray([m[key] for m in fetched], dtype=np.float64)
    summary[key] = float(values.sum() if key == "nonfinite" else values.mean())
  return summary


def skip_counts_over_shards(counts: Mapping[str, float], layout) -> Dict[str, float]:
  """The run's skip counts by reason: each data shard's input pipeline counts the records it read,
  so in a multi-process run the counts are summed over the shards (one process per data shard
  contributes, `layout.is_first_host_in_replica_set`). Every process calls this at the same step.
  """
  if jax.process_count() == 1 or not counts:
    return dict(counts)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = sorted(counts)
  # int32: jax without x64 would narrow int64; a shard skipping 2**31 records is not a real run.
  local = np.asarray([counts[n] if layout.is_first_host_in_replica_set else 0 for n in names],
                     np.int32)
  totals = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(names)).sum(0)
  return {name: float(total) for name, total in zip(names, totals)}


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
  if hasattr(task, "eval_hooks"):  # a task's own evaluations, built (and checked) before training
    eval_hooks = list(eval_hooks) + list(task.eval_hooks(workdir))
  partitioner = _checked_partitioner(config)
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
  layout = partitioner.get_data_layout(config.batch_size)
  if restore_step is not None and restore_data_position and not checkpoints.has_iterator_state(
      checkpoints.checkpoint_dir(restore_dir, restore_step), layout.shard_id, layout.num_shards):
    restore_data_position = False
    logging.warning(
        "the checkpoint holds input-iterator states %s, none for data shard %d of %d (it was "
        "written by a run with another number of processes): the train state is restored and "
        "the input pipeline starts afresh", checkpoints.iterator_state_names(
            checkpoints.checkpoint_dir(restore_dir, restore_step)),
        layout.shard_id, layout.num_shards)
  data_seed = config.seed_tf
  if restore_step is not None and not restore_data_position:
    data_seed = config.seed_tf + restore_step  # a fresh order, not a replay of the first batches
  make_dataset = make_dataset or task.train_dataset
  try:
    dataset = make_dataset(config, layout.shard_id, layout.num_shards, data_seed)
  except ValueError as err:  # the data the config names cannot be found or read
    raise config_lib.ConfigError(f"training data: {err}") from None
  try:
    checkpoints.check_writable(workdir)
  except checkpoints.CheckpointWriteError as err:
    raise config_lib.ConfigError(f"--workdir: {err}") from None
  checkpoints.remove_incomplete(workdir)
  trainer = Trainer(config, task, partitioner, progress)
  pretrained = None
  if restore_step is None and config.pretrain_dir:
    pretrained = _load_pretrained(config, task, trainer)  # checked before anything is compiled
  align_processes(partitioner.mesh, f"flip_train_start_{next(_TRAIN_STARTS)}")
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
    if pretrained is not None and hasattr(task, "load_pretrained_params"):
      state = trainer.merge_params(state, pretrained)
      logging.info("loaded pretrained parameters from %s", config.pretrain_dir)
    elif pretrained is not None:
      state = trainer.replace_params(state, pretrained)
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
    step_now = int(step_progress.step)
    if checkpoints.latest_complete_step(workdir) == step_now:
      return
    checkpoints.check_finite(state.state_dict(), f"step {step_now}")
    writer.flush()  # the events of every step up to this checkpoint are on disk before it is
    try:
      checkpoints.write_meta(workdir, step_now, {
          "step": step_now, "samples_seen": step_progress.samples_seen,
          "batch_size": config.batch_size, "num_processes": jax.process_count(),
          "data_shards": layout.num_shards, "config": config.to_json_best_effort()})
      checkpointer.save(state)
    except Exception as err:  # pylint: disable=broad-except (OSError, tf and tensorstore errors)
      checkpoints.remove_incomplete(workdir, step_now)
      latest = checkpoints.latest_complete_step(workdir)
      previous = ("no earlier checkpoint" if latest is None else
                  f"the last complete checkpoint {checkpoints.checkpoint_dir(workdir, latest)} "
                  "is intact")
      raise checkpoints.CheckpointWriteError(
          f"could not write the checkpoint of step {step_now} to {workdir}: "
          f"{checkpoints.describe_write_error(err)}; {previous}") from err
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
    while step < last_step and not watcher.stop_agreed():
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
        scalars.update({f"data/skipped/{k}": v
                        for k, v in skip_counts_over_shards(skipped_now, layout).items()})
        writer.write_scalars(step, scalars)
        print(_format_console(step, last_step, scalars), flush=True)
        last_scalars = scalars
        if consecutive_nonfinite >= config.max_consecutive_nonfinite:
          raise NonFiniteError(
              f"{consecutive_nonfinite} consecutive steps had a non-finite loss, gradient or "
              "update "
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
  preempted = watcher.requested and step < last_step
  logging.info("stopped at step %d after %.1f s%s", step, time.time() - t_start,
               " (preempted)" if preempted else "")
  return {"step": step, "state": state, "metrics": last_scalars, "preempted": preempted,
          "signal": watcher.signal_number if preempted else None, "workdir": workdir}


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
