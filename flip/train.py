"""The one training loop: every task (FLIP, MAE, linear probe, fine-tuning) runs through it.

`train_and_evaluate(config, workdir)` plans where the run starts (flip.restore_plan), builds the
task, the partitioner and the evaluators (flip.builders, flip.evals), the partitioned state and
step (flip.trainer), then steps, logs, evaluates and checkpoints until `num_epochs` worth of
samples are seen (or `config.num_train_steps` steps). Only main.py imports this module.

Checks before any compute, each a one-line `flip.config.ConfigError` (or `EvalError` for
evaluation data): the partitioner's mesh fits the devices, the batch divides over the
data-parallel size, the training data can be listed (the task's dataset is built before anything
is compiled), every configured evaluator's data can be found, the workdir is writable, and
`config.pretrain_dir` fits the model (shapes checked against `jax.eval_shape` of the init). The
processes of a multi-process run then meet and open their collectives together
(flip.processes.align_processes).

Per log step: one console line (step, loss, lr, speed, ETA, data skipped by reason), the same
scalars in tensorboard, the data skip counts summed over the data shards. A step that is not
finite is skipped on device (flip.trainer); `config.max_consecutive_nonfinite` of them in a row
stop the run with `NonFiniteError`, and a state holding a non-finite value is never saved.

Checkpoints: every `checkpoint_every_steps` (or `save_every_epochs`) and at the end, through t5x's
Checkpointer with the input iterator beside the arrays, the samples seen and the config in a
sidecar (flip.checkpoints). A checkpoint becomes visible only when complete, so a run killed at
any point resumes from the last complete one; the tensorboard events are flushed before every
checkpoint, so every logged step up to it is on disk. A checkpoint that cannot be written stops
the run with `CheckpointWriteError`; the previous ones are intact. SIGTERM/SIGINT: the processes
agree on the step to stop at, write a final checkpoint and return `preempted` with the signal
(main.py exits with 128 + signal).
"""

import itertools
import math
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
from t5x import checkpoints as t5x_checkpoints

from flip import builders
from flip import checkpoints
from flip import config as config_lib
from flip import metrics_writer
from flip import optim
from flip import processes
from flip import restore_plan
from flip import trainer as trainer_lib
from flip.evals import registry as evals_registry
from flip.tasks import registry

_TRAIN_STARTS = itertools.count()  # barrier names: every process counts its runs alike
CONSOLE_SCALARS = ("loss", "lr", "logit_scale", "grad_norm", "steps_per_sec", "images_per_sec")


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def total_samples(config) -> float:
  return float(config.num_epochs) * float(config.samples_per_epoch)


def checkpoint_interval_steps(config) -> int:
  if config.checkpoint_every_steps > 0:
    return int(config.checkpoint_every_steps)
  return max(1, int(round(config.save_every_epochs * config.samples_per_epoch / config.batch_size)))


def last_step(config, progress: trainer_lib.Progress) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  remaining = max(0.0, total_samples(config) - progress.samples_seen)
  return progress.step + int(math.ceil(remaining / config.batch_size))


def lr_at(config, progress: trainer_lib.Progress) -> float:
  """The learning rate used for the step that just finished (host-side, for logging)."""
  epoch = (progress.samples_seen - config.batch_size) / config.samples_per_epoch
  return float(optim.epoch_schedule(config)(max(epoch, 0.0)))


def host_metrics(metrics_list: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
  """Per-step device metrics -> host floats: means over the steps, `nonfinite` summed."""
  fetched = jax.device_get(list(metrics_list))
  summary = {}
  for key in fetched[0]:
    values = np.asarray([m[key] for m in fetched], dtype=np.float64)
    summary[key] = float(values.sum() if key == "nonfinite" else values.mean())
  return summary


def format_console(step: int, total: int, scalars: Mapping[str, float]) -> str:
  parts = [f"step {step}/{total}"]
  parts += [f"{key} {scalars[key]:.4g}" for key in CONSOLE_SCALARS if key in scalars]
  if "eta_min" in scalars:
    parts.append(f"eta {scalars['eta_min']:.1f} min")
  skipped = {k: v for k, v in scalars.items() if k.startswith("data/skipped/") and v}
  if skipped:
    parts.append("skipped " + ", ".join(f"{k.split('/')[-1]}={int(v)}" for k, v in skipped.items()))
  return " | ".join(parts)


def flat_hparams(config) -> Dict[str, Any]:
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


class TrainingRun:
  """One call of the loop: everything is built and checked in the constructor (no compute),
  `run()` steps until the end or a stop signal."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               make_dataset: Optional[Callable[..., Any]] = None):
    self.config = config
    self.workdir = workdir
    self.task = builders.build_task(config)
    self.partitioner = builders.checked_partitioner(config, config.batch_size)
    self.layout = self.partitioner.get_data_layout(config.batch_size)
    self.plan = restore_plan.plan_restore(config, workdir, self.layout)
    self.last_step = last_step(config, self.plan.progress)
    problem = restore_plan.start_problem(config, self.plan, self.last_step)
    if problem is not None and problem.refuse:
      raise config_lib.ConfigError(problem.message)
    if problem is not None:
      logging.warning(problem.message)
    make_dataset = make_dataset or self.task.train_dataset
    try:
      self.dataset = make_dataset(config, self.layout.shard_id, self.layout.num_shards,
                                  self.plan.data_seed)
    except ValueError as err:  # the data the config names cannot be found or read
      raise config_lib.ConfigError(f"training data: {err}") from None
    try:
      checkpoints.check_writable(workdir)
    except checkpoints.CheckpointWriteError as err:
      raise config_lib.ConfigError(f"--workdir: {err}") from None
    checkpoints.remove_incomplete(workdir)
    self.trainer = trainer_lib.Trainer(config, self.task, self.partitioner, self.plan.progress)
    self.pretrained = None
    if self.plan.fresh and config.pretrain_dir:  # checked before anything is compiled
      self.pretrained = builders.load_pretrained_params(config, self.task,
                                                        self.trainer.state_shape.params)
    self.writer = metrics_writer.make_metric_writer(workdir)
    self.evaluators = evals_registry.build_evaluators(config, evals_registry.EvalContext(
        config=config, task=self.task, partitioner=self.partitioner,
        params_axes=flax.core.unfreeze(self.trainer.state_axes.params),
        mutables_axes=flax.core.unfreeze(self.trainer.state_axes.flax_mutables), workdir=workdir,
        writer=self.writer))

  # --- start ----------------------------------------------------------------------------------
  def initial_state(self, data_iter):
    plan, config = self.plan, self.config
    if plan.fresh:
      state = self.trainer.init_state()
      if self.pretrained is not None:
        if self.task.has(registry.Capability.LOADS_PRETRAINED_SUBSET):
          state = self.trainer.merge_params(state, self.pretrained)
        else:
          state = self.trainer.replace_params(state, self.pretrained)
        logging.info("loaded pretrained parameters from %s", config.pretrain_dir)
      self.writer.write_hparams(flat_hparams(config))
      return state
    logging.info("resuming from %s at step %d (%.0f samples seen)", plan.checkpoint_dir,
                 plan.progress.step, plan.progress.samples_seen)
    restorer = self.checkpointer
    if plan.restore_dir != self.workdir or not plan.restore_data_position:
      restorer = t5x_checkpoints.Checkpointer(
          self.trainer.state_shape, self.partitioner, plan.restore_dir,
          dataset_iterator=data_iter if plan.restore_data_position else None)
    return restorer.restore(path=plan.checkpoint_dir)

  # --- per step -------------------------------------------------------------------------------
  def save(self, state, progress: trainer_lib.Progress) -> None:
    step, workdir = int(progress.step), self.workdir
    if checkpoints.latest_complete_step(workdir) == step:
      return
    checkpoints.check_finite(state.state_dict(), f"step {step}")
    self.writer.flush()  # the events of every step up to this checkpoint are on disk before it is
    try:
      checkpoints.write_meta(workdir, step, {
          "step": step, "samples_seen": progress.samples_seen,
          "batch_size": self.config.batch_size, "num_processes": jax.process_count(),
          "data_shards": self.layout.num_shards, "config": self.config.to_json_best_effort()})
      self.checkpointer.save(state)
    except Exception as err:  # pylint: disable=broad-except (OSError, tf and tensorstore errors)
      checkpoints.remove_incomplete(workdir, step)
      latest = checkpoints.latest_complete_step(workdir)
      previous = ("no earlier checkpoint" if latest is None else
                  f"the last complete checkpoint {checkpoints.checkpoint_dir(workdir, latest)} "
                  "is intact")
      raise checkpoints.CheckpointWriteError(
          f"could not write the checkpoint of step {step} to {workdir}: "
          f"{checkpoints.describe_write_error(err)}; {previous}") from err
    checkpoints.prune_meta(workdir)

  def evaluate(self, state, step: int, final: bool) -> Dict[str, float]:
    scalars = {}
    for evaluator in self.evaluators:
      if final or (evaluator.every_steps and step % evaluator.every_steps == 0):
        scalars.update(evaluator.run(state.params, state.flax_mutables, step))
    if scalars:  # the evaluators print their own results
      self.writer.write_scalars(step, scalars)
    return {k: float(v) for k, v in scalars.items()}

  def log(self, step: int, progress, pending_metrics, skipped, seconds: float,
          steps_done: int) -> Dict[str, float]:
    config = self.config
    scalars = host_metrics(pending_metrics)
    steps_per_sec = steps_done / max(seconds, 1e-9)
    scalars.update({
        "lr": lr_at(config, progress),
        "epoch": progress.samples_seen / config.samples_per_epoch,
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * config.batch_size,
        "eta_min": (self.last_step - step) / max(steps_per_sec, 1e-9) / 60.0,
    })
    scalars.update({f"data/skipped/{k}": v for k, v in
                    processes.skip_counts_over_shards(skipped, self.layout).items()})
    return scalars

  # --- the loop -------------------------------------------------------------------------------
  def run(self) -> Dict[str, Any]:
    config, workdir = self.config, self.workdir
    processes.align_processes(self.partitioner.mesh, f"flip_train_start_{next(_TRAIN_STARTS)}")
    data_iter = iter(self.dataset)
    self.checkpointer = t5x_checkpoints.Checkpointer(
        self.trainer.state_shape, self.partitioner, workdir, dataset_iterator=data_iter,
        keep=config.keep_checkpoints, keep_dataset_checkpoints=config.keep_checkpoints)
    state = self.initial_state(data_iter)
    ckpt_every = checkpoint_interval_steps(config)
    log_every = max(1, int(config.log_every_steps))
    watcher = processes.PreemptionWatcher()
    progress = self.plan.progress
    step = progress.step
    pending, consecutive_nonfinite, nonfinite_total = [], 0, 0
    last_scalars: Dict[str, float] = {}
    skipped: Dict[str, float] = {}
    t_start = t_log = time.time()
    step_log = step
    try:
      while step < self.last_step and not watcher.stop_agreed():
        batch = dict(next(data_iter))
        skipped = {k: float(np.asarray(v)) for k, v in batch.pop("skipped", {}).items()}
        state, metrics = self.trainer.train_step(
            state, {k: np.asarray(v) for k, v in batch.items()})
        step += 1
        progress = trainer_lib.Progress(step, progress.samples_seen + config.batch_size)
        pending.append(metrics)
        if step % log_every == 0 or step == self.last_step:
          scalars = self.log(step, progress, pending, skipped, time.time() - t_log,
                             step - step_log)
          nonfinite_now = int(scalars.pop("nonfinite"))
          nonfinite_total += nonfinite_now
          consecutive_nonfinite = (consecutive_nonfinite + nonfinite_now
                                   if nonfinite_now == len(pending) else nonfinite_now)
          scalars["nonfinite_steps_total"] = nonfinite_total
          pending, t_log, step_log = [], time.time(), step
          self.writer.write_scalars(step, scalars)
          print(format_console(step, self.last_step, scalars), flush=True)  # every process
          last_scalars = scalars
          if consecutive_nonfinite >= config.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{consecutive_nonfinite} consecutive steps had a non-finite loss, gradient or "
                f"update (limit config.max_consecutive_nonfinite="
                f"{config.max_consecutive_nonfinite}); last good checkpoint: "
                f"{checkpoints.latest_complete_step(workdir)}")
        if step % ckpt_every == 0:
          self.save(state, progress)
        if step != self.last_step:
          last_scalars.update(self.evaluate(state, step, final=False))
      self.save(state, progress)
      if step >= self.last_step:
        last_scalars.update(self.evaluate(state, step, final=True))
    finally:
      watcher.restore()
      self.writer.flush()
    preempted = watcher.requested and step < self.last_step
    logging.info("stopped at step %d after %.1f s%s", step, time.time() - t_start,
                 " (preempted)" if preempted else "")
    return {"step": step, "state": state, "metrics": last_scalars, "preempted": preempted,
            "signal": watcher.signal_number if preempted else None, "workdir": workdir}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_dataset: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there); returns
  {"step", "state", "metrics", "preempted", "signal", "workdir"}.

  `make_dataset(config, shard_index, num_shards, seed)` defaults to the task's training data.
  The evaluators of `config.evals` run at their periods and at the end; their scalars are logged.
  """
  return TrainingRun(config, workdir, make_dataset).run()
