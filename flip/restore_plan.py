"""Where a training run starts: from which checkpoint, at which progress, with which input
position, decided before anything is built or compiled.

A run restores the workdir's newest complete checkpoint when there is one (a preempted run
restarted with the same command line continues its own progress), else `config.resume_dir`'s,
else it starts fresh (and may load `config.pretrain_dir`'s parameters; that is the loop's job).
Progress is measured in samples: `samples_seen` from the checkpoint's meta lets a run resumed with
another batch size or `num_epochs` continue its schedule at the right virtual epoch.

The input position (t5x's saved tf.data iterator) is restored only when it fits: the saved
iterator holds the whole pipeline, batch size included, and one state per data shard. With another
batch size, or a checkpoint written by a run with another number of processes, the train state is
restored and the input pipeline starts afresh, seeded with `config.seed_tf + step` so it does not
replay the first batches the run already saw.

`start_problem` says, before any compute, when a FLIP run will not do what its command line
suggests. FLIP's README prints its unmasked-tuning line with a missing line continuation, so the
command as a shell runs it has `mask_ratio=0.0` but no `pretrain_dir` (and FLIP's own num_epochs):
- restored from a checkpoint whose saved `model.model_img.mask_ratio` differs from this config's,
  with no steps left (the restored progress is already at or past the end): the command asks for
  another phase on a finished run and would train nothing. Refused (ConfigError, exit 2).
- restored with no steps left and the same mask ratio: a finished run restarted; one warning line.
- a fresh `flip` task run with `mask_ratio == 0` and no `pretrain_dir`: trains an unmasked model
  from scratch, which is not unmasked tuning; one warning line (a from-scratch unmasked baseline
  is a legitimate run, so it is not refused).
Each message says what to add.
"""

import dataclasses
import json
from typing import Any, Dict, Optional

from absl import logging

from flip import checkpoints
from flip import trainer as trainer_lib


@dataclasses.dataclass(frozen=True)
class RestorePlan:
  restore_dir: str
  step: Optional[int]  # None: a fresh start
  progress: trainer_lib.Progress
  restore_data_position: bool
  data_seed: int
  # The restored checkpoint's config.model.model_img.mask_ratio (None: fresh, or not recorded).
  saved_mask_ratio: Optional[float] = None

  @property
  def fresh(self) -> bool:
    return self.step is None

  @property
  def checkpoint_dir(self) -> str:
    return checkpoints.checkpoint_dir(self.restore_dir, self.step)


def restore_dir(config: Any, workdir: str) -> str:
  """The workdir when it holds a checkpoint, else `config.resume_dir` when it holds one, else the
  workdir (fresh)."""
  if checkpoints.latest_complete_step(workdir) is not None:
    return workdir
  if config.resume_dir and checkpoints.latest_complete_step(config.resume_dir) is not None:
    return config.resume_dir
  return workdir


def plan_restore(config: Any, workdir: str, layout: Any) -> RestorePlan:
  """The plan for `config` in `workdir`, for this process's data shard (`layout`)."""
  directory = restore_dir(config, workdir)
  step = checkpoints.latest_complete_step(directory)
  if step is None:
    return RestorePlan(directory, None, trainer_lib.Progress(), True, config.seed_tf)
  meta = checkpoints.read_meta(directory, step) or {}
  progress = trainer_lib.Progress(
      step=step, samples_seen=float(meta.get("samples_seen", step * config.batch_size)))
  restore_position = True
  saved_batch_size = meta.get("batch_size", config.batch_size)
  ckpt_dir = checkpoints.checkpoint_dir(directory, step)
  if saved_batch_size != config.batch_size:
    restore_position = False
    logging.warning("config.batch_size changed from %d to %d since the checkpoint: the input "
                    "pipeline starts afresh (its saved position is for the old batch size)",
                    saved_batch_size, config.batch_size)
  elif not checkpoints.has_iterator_state(ckpt_dir, layout.shard_id, layout.num_shards):
    restore_position = False
    logging.warning(
        "the checkpoint holds input-iterator states %s, none for data shard %d of %d (it was "
        "written by a run with another number of processes): the train state is restored and "
        "the input pipeline starts afresh", checkpoints.iterator_state_names(ckpt_dir),
        layout.shard_id, layout.num_shards)
  data_seed = config.seed_tf if restore_position else config.seed_tf + step
  return RestorePlan(directory, step, progress, restore_position, data_seed,
                     saved_mask_ratio(meta))


def saved_mask_ratio(meta: Dict[str, Any]) -> Optional[float]:
  """config.model.model_img.mask_ratio of the config saved in a checkpoint's meta, if any."""
  saved = meta.get("config")
  if isinstance(saved, str):
    try:
      saved = json.loads(saved)
    except ValueError:
      return None
  try:
    return float(saved["model"]["model_img"]["mask_ratio"])
  except (TypeError, KeyError, ValueError):
    return None


TUNING_HINT = ("for FLIP's unmasked tuning use a new --workdir and add "
               "--config.pretrain_dir=<the pretraining workdir> (and FLIP's "
               "--config.num_epochs=100 --config.warmup_epochs=20)")


@dataclasses.dataclass(frozen=True)
class StartProblem:
  refuse: bool  # True: a ConfigError (exit 2); False: a warning
  message: str  # one line


def start_problem(config: Any, plan: RestorePlan, last_step: int) -> Optional[StartProblem]:
  """The one-line problem with starting this run as planned (rules in the module docstring)."""
  mask_ratio = _mask_ratio(config)
  if not plan.fresh and last_step <= plan.progress.step:
    where = (f"the checkpoint of step {plan.progress.step} in {plan.restore_dir} "
             f"({plan.progress.samples_seen:.0f} samples) is already at or past the end of "
             f"this run's schedule (step {last_step})")
    if (mask_ratio is not None and plan.saved_mask_ratio is not None
        and mask_ratio != plan.saved_mask_ratio):
      return StartProblem(True, (
          f"nothing to train: {where}, and it was trained with model_img.mask_ratio="
          f"{plan.saved_mask_ratio:g}, not {mask_ratio:g}; {TUNING_HINT}"))
    return StartProblem(False, f"nothing to train: {where}; to train further raise "
                               "--config.num_epochs, or " + TUNING_HINT)
  if (plan.fresh and config.get("task") == "flip" and mask_ratio == 0.0
      and not config.get("pretrain_dir")):
    return StartProblem(False, (
        "training from scratch with model_img.mask_ratio=0 and no config.pretrain_dir: this is "
        f"not unmasked tuning; {TUNING_HINT}"))
  return None


def _mask_ratio(config: Any) -> Optional[float]:
  try:
    return float(config.model.model_img.mask_ratio)
  except (AttributeError, KeyError):
    return None
