"""MAE reconstruction grids of a checkpoint as a PNG file: the `python -m flip.visualize` command.

    python -m flip.visualize --workdir=$WD --config=configs/cfg_mae_demo.py --num_images=8 \
        --out=/tmp/grid.png [--checkpoint=$WD/checkpoint_N] [--split=eval|train] [--seed=0]

The grid (one row per image: original, masked input, reconstruction, reconstruction with the
visible patches pasted back) and the held-out loss are those of the reconstruction evaluator
(`flip.evals.reconstruction`, which documents the panels). Images are the first `num_images` of
the reconstruction entry's dataset in `config.evals` (`--split=eval`, the default when that entry
has a dataset) or of `config.data.train` (`--split=train`, the default otherwise), with the
evaluation resize + centre crop; the masks come from fixed noise (`--seed`). The checkpoint is
`--checkpoint`, else `config.pretrain_dir`, else the newest in `--workdir`.
"""

import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from flip import builders
from flip import checkpoints
from flip import config as config_lib
from flip.evals import core
from flip.evals import reconstruction
from flip.evals import registry
from flip.tasks import registry as tasks_registry

TRAIN = "train"
EVAL = "eval"


def reconstruction_dataset(config: ml_collections.ConfigDict) -> str:
  """The dataset of the first `config.evals` entry of type "reconstruction" ("" if none)."""
  for entry in registry.entries(config).values():
    if entry.get("type") == "reconstruction" and entry.get("dataset"):
      return entry.dataset
  return ""


def sample_images(config: ml_collections.ConfigDict, num_images: int,
                  split: Optional[str] = None) -> np.ndarray:
  """The first images of the reconstruction entry's dataset (or `config.data.train`)."""
  held_out = reconstruction_dataset(config)
  if split is None:
    split = EVAL if held_out else TRAIN
  if split == EVAL and not held_out:
    raise core.EvalConfigError("--split=eval but no config.evals entry of type 'reconstruction' "
                               "has a dataset")
  spec = held_out if split == EVAL else config.data.train
  return reconstruction.load_images(config, spec, num_images, split)


def run(config: ml_collections.ConfigDict, workdir: str, out: str, num_images: int,
        checkpoint: Optional[str] = None, split: Optional[str] = None, seed: int = 0) -> float:
  """Writes the grid of a checkpoint to `out`; returns the loss on those images and masks."""
  if num_images <= 0:
    raise core.EvalError(f"--num_images must be > 0, got {num_images}")
  ckpt_dir = (checkpoints.find_checkpoint_dir(checkpoint) if checkpoint
              else builders.eval_checkpoint_dir(config, workdir))
  task = builders.build_task(config)
  if not task.has(tasks_registry.Capability.RECONSTRUCTS):
    raise core.EvalError(f"config.task={config.get('task')!r} is not an MAE task")
  partitioner = builders.checked_partitioner(config)
  images = sample_images(config, num_images, split)
  params, _ = builders.load_eval_variables(ckpt_dir, task, partitioner)
  reconstructor = reconstruction.Reconstructor(
      task, partitioner, builders.params_mesh_axes(task, partitioner), images, seed)
  grid, loss = reconstructor(params)
  reconstruction.write_png(grid, out)
  print(f"wrote {out}: {num_images} images from {ckpt_dir}, {reconstruction.LOSS_TAG} "
        f"{loss:.4f}", flush=True)
  return loss


# --- command line -------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Run directory holding checkpoint_<step> directories.")
  config_flags.DEFINE_config_file("config", None, "The MAE experiment config.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A checkpoint_<step> directory (default: newest).")
  flags.DEFINE_integer("num_images", reconstruction.DEFAULT_NUM_IMAGES, "Rows of the grid.")
  flags.DEFINE_string("out", None, "PNG file to write.")
  flags.DEFINE_enum("split", None, [EVAL, TRAIN],
                    "Images from the reconstruction entry's dataset or config.data.train.")
  flags.DEFINE_integer("seed", 0, "Seed of the masks.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("config", "out"):
    if FLAGS[name].value is None:
      raise app.UsageError(f"--{name} is required")
  if FLAGS.workdir is None and FLAGS.checkpoint is None and not FLAGS.config.get("pretrain_dir"):
    raise app.UsageError("--workdir (or --checkpoint) is required")
  try:
    run(FLAGS.config, FLAGS.workdir or "", FLAGS.out, FLAGS.num_images, FLAGS.checkpoint,
        FLAGS.split, FLAGS.seed)
  except config_lib.ConfigError as err:
    config_lib.exit_on_config_error(err)
  except (checkpoints.CheckpointError, core.EvalError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  try:
    return config_lib.parse_config_flags(argv, flags.FLAGS)
  except config_lib.ConfigError as err:
    config_lib.exit_on_config_error(err)


if __name__ == "__main__":
  from flip import process_setup  # pylint: disable=g-import-not-at-top
  process_setup.configure_process()
  logging.set_verbosity(logging.WARNING)
  define_flags()
  app.run(main, flags_parser=parse_flags)
