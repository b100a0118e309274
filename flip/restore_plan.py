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
"""

import dataclasses
from typing import Any, Optional

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
  return RestorePlan(directory, step, progress, restore_position, data_seed)
